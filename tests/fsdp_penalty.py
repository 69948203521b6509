"""The approximated R1/R2 of one discriminator on fixed data, under this launch's distributed strategy
and mixed precision: a helper that `tests/test_fsdp.py` launches (not a test itself).

    accelerate launch ... tests/fsdp_penalty.py OUT.json

The discriminator is prepared as `train_afm.py` prepares it (`prepare_network`: under FSDP2 with mixed
precision its parameters stay in full precision, computing in bf16 through autocast); rank 0 writes
the mean R1 and R2 of the penalty's samples to OUT.json.
"""

import json
import sys

import torch
from accelerate import Accelerator

from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
from diffusers_afm.training import AFMObjective, AFMTrainingStep, flow_weight, perturbed_batch_size
from diffusers_afm.training.distributed import prepare_network

TRUNK = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=32,
             num_classes=10)


def main(out: str) -> None:
    accelerator = Accelerator()
    torch.manual_seed(0)
    generator = AdversarialFlowTransformer2DModel(**TRUNK)
    discriminator = AdversarialFlowDiscriminator(**TRUNK)
    with torch.no_grad():  # open adaLN-Zero's gates: every block acts on the logit, as in a trained network
        for p in discriminator.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    opt_g = torch.optim.AdamW(generator.parameters(), lr=0.0)
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=0.0)
    generator, opt_g, _ = prepare_network(accelerator, generator, opt_g, None)
    discriminator, opt_d, _ = prepare_network(accelerator, discriminator, opt_d, None, full_precision_parameters=True)
    objective = AFMObjective(gp_batch_ratio=1.0)
    step = AFMTrainingStep(accelerator, generator, discriminator, opt_g, opt_d, objective,
                           noise_generator=torch.Generator().manual_seed(2 + accelerator.process_index))
    data = torch.Generator().manual_seed(3 + accelerator.process_index)
    r1, r2 = [], []
    with torch.no_grad():
        for _ in range(4):
            x0 = torch.randn(8, 4, 8, 8, generator=data)
            labels = torch.randint(0, 10, (8,), generator=data)
            s, t, x_s, real = step._draw_pair(x0)
            fake = step._generate(generator, x_s, labels, s, t)
            n = perturbed_batch_size(8, objective.gp_batch_ratio)
            logits_real, logits_fake, real_perturbed, fake_perturbed = step.discriminator_logits(real, fake, labels, t, n)
            scale = objective.gp_scale * flow_weight(s, t)[:n] / objective.gp_eps**2
            r1.append((scale * (real_perturbed - logits_real[:n]).square()).mean())
            r2.append((scale * (fake_perturbed - logits_fake[:n]).square()).mean())
    means = accelerator.reduce(torch.stack([torch.stack(r1).mean(), torch.stack(r2).mean()]), reduction="mean").tolist()
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump({"r1": means[0], "r2": means[1], "distributed_type": str(accelerator.distributed_type),
                       "mixed_precision": accelerator.mixed_precision}, f)


if __name__ == "__main__":
    main(sys.argv[1])

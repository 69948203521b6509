"""`torch.compile` of both networks runs the whole training step, with no graph break, as eager does.

The trainer's `--compile` compiles each network's transformer block in place
(`compile_repeated_blocks(fullgraph=True, dynamic=False)`): `fullgraph=True` turns any graph break
into an error. Inductor needs a C++ compiler on a CPU; compiling the tiny models here takes about
20 s.
"""

import shutil
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import tiny_generator_config

from diffusers_afm import AdversarialFlowDiscriminator, AdversarialFlowTransformer2DModel
from diffusers_afm.training import AFMObjective, AFMTrainingStep, GradientNormalization, ModelEMA

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on a CPU needs a C++ compiler",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(compiled: bool, iterations: int = 2):
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    generator = AdversarialFlowTransformer2DModel(**tiny_generator_config())
    discriminator = AdversarialFlowDiscriminator(**tiny_generator_config())
    accelerator = Accelerator(cpu=True)
    optimizer_g = torch.optim.AdamW(generator.parameters(), lr=1e-3, betas=(0.0, 0.9))
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), lr=1e-3, betas=(0.0, 0.9))
    generator, discriminator, optimizer_g, optimizer_d = accelerator.prepare(
        generator, discriminator, optimizer_g, optimizer_d
    )
    ema = ModelEMA(generator)  # before compiling, as the trainer does
    if compiled:
        for model in (generator, discriminator):
            accelerator.unwrap_model(model).compile_repeated_blocks(fullgraph=True, dynamic=False)
    step = AFMTrainingStep(
        accelerator, generator, discriminator, optimizer_g, optimizer_d, AFMObjective(),
        grad_norm=GradientNormalization(), ema=ema, ema_decay=0.5, noise_generator=torch.Generator().manual_seed(0),
    )
    data = torch.Generator().manual_seed(1)
    x0, labels = torch.randn(8, 4, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)
    logs = [step(x0, labels, i) for i in range(iterations)]
    AcceleratorState._reset_state(True)
    return logs, generator.state_dict(), ema.state_dict()


def test_compiled_training_step_matches_eager():
    from torch._dynamo.utils import counters

    eager_logs, eager_weights, eager_ema = _train(compiled=False)
    counters.clear()
    compiled_logs, compiled_weights, compiled_ema = _train(compiled=True)
    assert not counters["graph_break"]
    # Compiling in place keeps the parameter names: checkpoints and the EMA are unchanged.
    assert list(compiled_weights) == list(eager_weights)
    for eager, compiled in zip(eager_logs, compiled_logs):
        for name in eager:
            torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-4, msg=name)
    for name in eager_weights:
        torch.testing.assert_close(compiled_weights[name], eager_weights[name], atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(compiled_ema[name], eager_ema[name], atol=1e-4, rtol=1e-4, msg=name)

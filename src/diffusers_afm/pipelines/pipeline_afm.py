"""`AFMPipeline`: sampling from an Adversarial Flow Model (class-conditional or unconditional), or
from a flow-matching velocity model (a SiT, or one post-trained with Continuous AFM).

A 1-NFE model is one generator forward pass from noise to a latent (or pixel) image, then the VAE
decode; multi-step and any-step models apply the step rule of `diffusers_afm.flow` N times.

AFM models take no `guidance_scale`: AFM has no classifier-free guidance to scale at sampling time. A
"guided" model had classifier guidance trained into its generator (docs/method.md, "Classifier
guidance"), so guided and guidance-free models sample the same way, in one pass per step.

Sampling goes through the pipeline's `scheduler`, as in every diffusers pipeline: saved in
`scheduler/`, swapped with `pipe.scheduler = OtherScheduler.from_config(pipe.scheduler.config)`.
Each model kind's default computes the reference's rule (`diffusers_afm.flow`) to the bit, on the
reference's grid `linspace(1, 0, N + 1)`, which the pipeline passes as `sigmas`:

| model | default scheduler |
|---|---|
| `FlowMatchingTransformer2DModel` (SiT, CAFM) | diffusers' `FlowMatchEulerDiscreteScheduler` (Euler); `FlowHeunScheduler` for Heun |
| `JiTTransformer2DModel` | `FlowHeunScheduler(final_euler_step=True)` (JiT's sampler) |
| AFM, v-prediction (multi-step, any-step) | diffusers' `FlowMatchEulerDiscreteScheduler`: `x_t = x_s + (t - s) v` |
| AFM, x-prediction (1 NFE, deep) | none: the generator's output is the sample |

Flow-matching models take any `num_inference_steps` and classifier-free guidance (`guidance_scale`,
1 = off; JiT's `guidance_interval`) through their null class (docs/method.md, "Continuous AFM";
docs/cafm.md, "JiT"). A folder written before schedulers (no `scheduler/`) loads with its kind's
default and samples the same images as before.

Fast sampling on a GPU (docs/performance.md): load in bf16 (`dtype=torch.bfloat16`), put the VAE in
channels-last (`pipe.vae.to(memory_format=torch.channels_last)`), and for 1-NFE sampling at a fixed
batch size capture the whole sample as a CUDA graph with `pipe.enable_cuda_graph(batch_size)`.
"""

import difflib
import inspect
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..flow import SOLVERS, check_guidance_interval, check_solver, guided_velocity, sample, sampling_timesteps
from ..models import AdversarialFlowTransformer2DModel, FlowMatchingTransformer2DModel, JiTTransformer2DModel
from ..schedulers.scheduling_flow_heun import FlowHeunScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ClassLabels = Union[int, str, List[Union[int, str]], torch.Tensor]


def _normalize_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


# Flow-matching models: the step count of a call without `num_inference_steps`.
DEFAULT_FLOW_STEPS = 50
FLOW_MODEL_CLASSES = ("FlowMatchingTransformer2DModel", "JiTTransformer2DModel")
# The `solver=` shorthand: each name and the scheduler it stands for (class, config overrides).
SOLVER_SCHEDULERS = {
    "euler": (FlowMatchEulerDiscreteScheduler, {}),
    "heun": (FlowHeunScheduler, {"final_euler_step": False}),
    "heun_final_euler": (FlowHeunScheduler, {"final_euler_step": True}),
}


def is_flow_model(transformer) -> bool:
    """Whether the transformer is a flow-matching velocity model (by class name, so that the copies
    of an exported folder answer as the installed classes do)."""
    return type(transformer).__name__ in FLOW_MODEL_CLASSES


def scheduler_for_solver(solver: str, config=None) -> SchedulerMixin:
    """The scheduler of a solver name ("euler", "heun", "heun_final_euler"), made from `config` (the
    pipeline's scheduler's, so that `num_train_timesteps` and `shift` carry over)."""
    if solver not in SOLVER_SCHEDULERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
    scheduler_class, overrides = SOLVER_SCHEDULERS[solver]
    accepted = inspect.signature(scheduler_class.__init__).parameters  # the other class's keys are not its business
    return scheduler_class.from_config({k: v for k, v in (config or {}).items() if k in accepted}, **overrides)


def default_scheduler(transformer) -> Optional[SchedulerMixin]:
    """The scheduler a pipeline of this model samples with when none is given (a folder written
    before schedulers loads with it): Euler for flow models (JiT: its own sampler, Heun with a final
    Euler step, the model class's `default_solver`) and v-prediction AFM generators; none for
    x-prediction generators, whose output is the sample."""
    if is_flow_model(transformer):
        return scheduler_for_solver(getattr(transformer, "default_solver", "euler"))
    if transformer.config.prediction_type == "velocity":
        return FlowMatchEulerDiscreteScheduler()
    return None


def set_sampling_timesteps(scheduler, num_inference_steps: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`scheduler.set_timesteps` on the reference's grid `linspace(1, 0, N + 1)` (passed as `sigmas`,
    as diffusers' flow pipelines do, to a scheduler that takes them; another keeps its own grid).
    Returns the timesteps (one per model call) and the flow time of each call, with the final time
    after them: `scheduler.sigmas` where the scheduler has them, else `timesteps / num_train_timesteps`."""
    if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(sigmas=sampling_timesteps(num_inference_steps)[:-1].tolist(), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # the first call: no look-up of the timestep (which would sync the device)
    timesteps = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) <= len(timesteps):
        sigmas = torch.cat([timesteps / scheduler.config.num_train_timesteps, timesteps.new_zeros(1)])
    return timesteps, sigmas.to(device=device, dtype=torch.float32)


def allowed_num_inference_steps(config) -> Optional[int]:
    """The step count a model supports: its trained `nfe`, or `None` (any) for an any-step model
    and for a flow-matching model."""
    return getattr(config, "nfe", None)


class AFMPipeline(DiffusionPipeline):
    r"""
    One-step (or few-step) image generation with an Adversarial Flow Model, class-conditional or
    unconditional (a model with `num_classes=1`).

    There is no `guidance_scale`: a guided AFM model had classifier guidance trained into its
    generator, so there is nothing to scale at sampling time (see the module docstring).

    Args:
        transformer ([`AdversarialFlowTransformer2DModel`], [`FlowMatchingTransformer2DModel`] or
            [`JiTTransformer2DModel`]): the AFM generator, or a flow-matching velocity model.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images; `None` for a pixel-space model.
        scheduler ([`SchedulerMixin`], *optional*): steps the sample from one model call to the next
            (`FlowMatchEulerDiscreteScheduler`, `FlowHeunScheduler`, ...); `None` takes the model kind's
            default (`default_scheduler`), which an x-prediction AFM generator does without.
        id2label (`dict`, *optional*): class id -> name (comma-separated synonyms allowed, as in
            ImageNet's "tench, Tinca tinca"); stored in `model_index.json`, used to look labels up by name.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "scheduler"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: Union[AdversarialFlowTransformer2DModel, FlowMatchingTransformer2DModel, JiTTransformer2DModel],
        vae: Optional[AutoencoderKL] = None,
        scheduler: Optional[SchedulerMixin] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
    ):
        super().__init__()
        if scheduler is None:
            scheduler = default_scheduler(transformer)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label={str(k): v for k, v in sorted(id2label.items())} or None)
        self.id2label = id2label
        # name -> ids; a name shared by two classes (ImageNet's "crane") maps to both and is ambiguous.
        self._name_to_ids: Dict[str, List[int]] = {}
        for class_id, names in id2label.items():
            for name in names.split(","):
                if name.strip():
                    self._name_to_ids.setdefault(_normalize_name(name), []).append(class_id)
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self._cuda_graph = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, with a one-line error naming the file for a damaged
        folder (a truncated weights file, weights the config does not fit, NaN or Inf weights)."""
        from ..utils import check_finite_weights, explain_load_error

        try:
            pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            clear = explain_load_error(err, str(pretrained_model_name_or_path))
            if clear is None:
                raise
            raise clear from None
        # Non-finite weights would sample black images without a word.
        check_finite_weights(pipeline.components, str(pretrained_model_name_or_path))
        return pipeline

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """Read `model_index.json`; in a folder written by `export_standalone`, point the entries that
        name the generated copies of our modules back at the installed modules.

        Such a folder names its copies by file (`_class_name: ["pipeline_afm", "AFMPipeline"]`,
        `transformer: ["transformer_afm", ...]`), which diffusers runs as remote code. This class is the
        installed code, so `AFMPipeline.from_pretrained` loads such a folder with it and runs none of
        the copies (the export leaves this method out of them).
        """
        config = super()._dict_from_json_file(json_file)
        # Each copy is named after the file of its class's module.
        modules = {cls.__module__.rsplit(".", 1)[-1]: cls.__module__
                   for cls in (AdversarialFlowTransformer2DModel, FlowMatchingTransformer2DModel, JiTTransformer2DModel,
                               FlowHeunScheduler)}
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        for name, entry in config.items():
            if isinstance(entry, list) and len(entry) == 2 and entry[0] in modules:
                config[name] = [modules[entry[0]], entry[1]]
        return config

    # ------------------------------------------------------------------ labels
    @property
    def labels(self) -> Dict[str, List[int]]:
        """Every class name (lower case) with the class ids it names."""
        return dict(self._name_to_ids)

    def get_label_ids(self, label: Union[str, List[str]]) -> List[int]:
        """Class ids for whole class names ("golden retriever"); a clear error lists close matches."""
        names = [label] if isinstance(label, str) else list(label)
        ids = []
        for name in names:
            key = _normalize_name(name)
            matches = self._name_to_ids.get(key)
            if matches is None:
                raise ValueError(f"`class_labels`: unknown class name {name!r}. {self._suggest(key)}")
            if len(matches) > 1:
                options = ", ".join(f"{i} ({self.id2label[i]!r})" for i in matches)
                raise ValueError(f"`class_labels`: the name {name!r} is ambiguous; pass one of the ids {options}.")
            ids.append(matches[0])
        return ids

    def _suggest(self, key: str) -> str:
        if not self._name_to_ids:
            return "This pipeline has no `id2label` mapping; pass integer class ids."
        word = re.compile(rf"\b{re.escape(key)}\b")
        close = [n for n in self._name_to_ids if word.search(n)]
        close += [n for n in difflib.get_close_matches(key, list(self._name_to_ids), n=5, cutoff=0.6) if n not in close]
        if close:
            return "Close matches: " + ", ".join(repr(n) for n in close[:8]) + "."
        return "See `pipe.labels` for the known names."

    def _class_ids(
        self,
        class_labels: Optional[ClassLabels],
        batch_size: Optional[int],
        num_images_per_label: int,
        num_latents: Optional[int],
        device: torch.device,
    ) -> torch.LongTensor:
        """One class id per image: the labels (ids or names) or, for an unconditional model, class 0
        `batch_size` times; each repeated `num_images_per_label` times in a row."""
        if not isinstance(num_images_per_label, int) or isinstance(num_images_per_label, bool) or num_images_per_label < 1:
            raise ValueError(f"`num_images_per_label` must be a positive integer, got {num_images_per_label!r}.")
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            if num_classes > 1:
                raise ValueError(
                    f"`class_labels` is required: this model is class-conditional ({num_classes} classes); pass "
                    "class ids or names (see `pipe.labels`). `batch_size` alone is for unconditional models."
                )
            if batch_size is None:
                batch_size = num_latents // num_images_per_label if num_latents else 1
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
            class_labels = [0] * batch_size
        elif batch_size is not None:
            raise ValueError(
                "Pass `class_labels` or `batch_size`, not both: with class labels the batch is one image per "
                "label (times `num_images_per_label`); `batch_size` is for unconditional models."
            )
        ids = self._label_ids(class_labels, num_classes)
        return torch.tensor(ids, dtype=torch.long, device=device).repeat_interleave(num_images_per_label)

    def _label_ids(self, class_labels: ClassLabels, num_classes: int) -> List[int]:
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.flatten().tolist()
        elif isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        if len(class_labels) == 0:
            raise ValueError("`class_labels` must hold at least one class id or name.")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < num_classes:
                    raise ValueError(f"`class_labels`: class id {label} is out of range; allowed: 0..{num_classes - 1}.")
                ids.append(label)
            else:
                raise ValueError(f"`class_labels` entries must be int ids or str names, got {type(label).__name__}.")
        return ids

    # ------------------------------------------------------------------ noise
    def _check_latents(self, latents: torch.Tensor, batch_size: int) -> None:
        config = self.transformer.config
        expected = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if tuple(latents.shape) != expected:
            raise ValueError(f"`latents` must have shape {expected} (batch, channels, height, width), got {tuple(latents.shape)}.")

    def prepare_latents(self, batch_size: int, generator, device: torch.device) -> torch.Tensor:
        """Initial noise `z`. Each sample draws from its own generator, so its noise is the same alone or in
        a batch (its image agrees to rounding: kernels round differently for different batch sizes).

        A list gives one generator per sample; a single generator seeds one per-sample generator
        for each sample in order (so sample i is reproducible whatever the batch size).
        """
        config = self.transformer.config
        shape = (1, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"`generator`: got a list of {len(generator)} generators for {batch_size} samples; pass one per sample.")
            generators = generator
        else:
            # Draw the per-sample seeds one at a time, so seed i does not depend on the batch size.
            device_ = generator.device if generator is not None else torch.device("cpu")
            seeds = [int(torch.randint(0, 2**62, (1,), generator=generator, device=device_)) for _ in range(batch_size)]
            generators = [torch.Generator(device_).manual_seed(seed) for seed in seeds]
        noise = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
        # A model trained on noise of another scale (JiT's 512 px models: 2) starts from that noise.
        return torch.cat(noise).to(device) * getattr(config, "noise_scale", 1.0)

    # ------------------------------------------------------------------ generate and decode
    def _denoise(
        self,
        latents: torch.Tensor,
        class_ids: torch.LongTensor,
        num_inference_steps: int,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = (),
        guidance_scale: float = 1.0,
        guidance_interval: Optional[Tuple[float, float]] = None,
        scheduler: Optional[SchedulerMixin] = None,
    ) -> torch.Tensor:
        """N-step sampling (docs/method.md, "Sampling with N steps") from the noise `latents` (float32) to
        the final latents (float32), through `scheduler` (default: the pipeline's).

        Each model call takes the flow time of its entry in the schedule (`scheduler.sigmas`, exactly
        the reference grid's values): a flow model its velocity there (under classifier-free guidance),
        an AFM generator the step from `s` to the next time `t`. Without a scheduler (x-prediction
        generators) the generator's output is the sample (`diffusers_afm.flow.sample`).
        `callback_on_step_end(pipe, i, s, {"latents": x_t})` runs after each completed step i (from
        time `s`; after Heun's corrector, not between its two calls) and may return replacement latents
        to continue from, as in diffusers' pipelines.
        """
        dtype = self.transformer.dtype
        scheduler = self.scheduler if scheduler is None else scheduler

        def on_step_end(i, s, x_t):
            tensors = {"latents": x_t}  # the `_callback_tensor_inputs`
            callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
            return callback_on_step_end(self, i, s, callback_kwargs).pop("latents", x_t)

        if scheduler is None:
            return sample(
                self._generator(class_ids), latents, num_inference_steps, self.transformer.config.prediction_type,
                progress=self.progress_bar if num_inference_steps > 1 else None,
                on_step_end=on_step_end if callback_on_step_end is not None else None,
            )
        if is_flow_model(self.transformer):
            velocity = guided_velocity(
                lambda x, t, labels: self.transformer(x.to(dtype), t, labels).sample.float(),
                class_ids, self.transformer.null_class_id, guidance_scale, guidance_interval,
            )

            def model_fn(x_s, s, t):
                return velocity(x_s, s)
        else:
            model_fn = self._generator(class_ids)

        timesteps, times = set_sampling_timesteps(scheduler, num_inference_steps, latents.device)
        batch = latents.shape[0]
        step_index, source = 0, times[0]
        calls = range(len(timesteps))
        for k in self.progress_bar(calls) if num_inference_steps > 1 else calls:
            if getattr(scheduler, "state_in_first_order", True):
                source = times[k]  # a step begins here (Heun: its predictor)
            output = model_fn(latents, times[k].expand(batch), times[k + 1].expand(batch))
            latents = scheduler.step(output, timesteps[k], latents, return_dict=False)[0]
            if getattr(scheduler, "state_in_first_order", True) or k == len(timesteps) - 1:
                if callback_on_step_end is not None:
                    latents = on_step_end(step_index, source, latents)
                step_index += 1
        return latents

    def _generator(self, class_ids: torch.LongTensor) -> Callable:
        """The AFM generator `G(x_s, c, s, t)` with the labels bound, its output in float32."""
        dtype = self.transformer.dtype
        return lambda x_s, s, t: self.transformer(x_s.to(dtype), class_ids, s, t).sample.float()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1], decoded in the VAE's dtype (and memory format); pixel-space
        models return their latents."""
        if self.vae is None:
            return latents
        return self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample

    @torch.no_grad()
    def enable_cuda_graph(self, batch_size: int) -> None:
        """Capture 1-NFE sampling of `batch_size` images (the generator's forward pass and the VAE
        decode) as one CUDA graph, replayed by later calls.

        A replay launches all of the sample's kernels at once, which removes eager mode's per-kernel
        launch cost (large at small batch sizes). Calls with exactly `batch_size` labels, one step and
        an image output use the graph; any other call runs as usual. The graph reads the weights
        where they are: loading new weights in place is seen, but after moving the pipeline or
        changing its dtype, call this again. Not for CPU-offloaded pipelines.
        `disable_cuda_graph()` drops it.
        """
        device = self._execution_device
        if device.type != "cuda":
            raise RuntimeError(
                f"`enable_cuda_graph` needs the pipeline on a CUDA device, but it is on {device}; "
                "move it first with `pipe.to('cuda')`."
            )
        config = self.transformer.config
        if is_flow_model(self.transformer) or allowed_num_inference_steps(config) not in (1, None):
            raise ValueError("`enable_cuda_graph` is for 1-step sampling, which this model does not do.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        self._cuda_graph = _CUDAGraphSampler(
            # One step from t = 1 to 0 needs no schedule (every scheduler's one step is this one), and
            # the reference rule makes no host synchronisation inside the graph.
            lambda latents, class_ids: self._decode(sample(self._generator(class_ids), latents, 1, config.prediction_type)),
            torch.zeros(shape, device=device),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def disable_cuda_graph(self) -> None:
        self._cuda_graph = None

    # ------------------------------------------------------------------ call
    def check_inputs(self, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_scale,
                     solver=None, num_inference_steps=None, guidance_interval=None):
        if is_flow_model(self.transformer):
            if solver is not None:
                check_solver(solver, num_inference_steps)
            check_guidance_interval(guidance_interval)
            if guidance_scale is not None:
                if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
                    raise ValueError(f"`guidance_scale` must be a number >= 0 (1 = no guidance), got {guidance_scale!r}.")
                if guidance_scale != 1 and self.transformer.null_class_id is None:
                    raise ValueError(
                        f"`guidance_scale`={guidance_scale} needs a model trained with class dropout (a null class); "
                        "this one has none: allowed: 1 (no guidance)."
                    )
        else:
            if guidance_scale is not None:
                raise ValueError(
                    "`guidance_scale` is not an argument for AFM models: AFM has no classifier-free guidance to scale. "
                    "A guided model had classifier guidance trained into its generator and samples like any other; "
                    "to sample with guidance, load a guided checkpoint. (Flow-matching models take it.)"
                )
            if solver is not None:
                raise ValueError(
                    "`solver` is not an argument for AFM models: their step rule is fixed by their training. "
                    "(Flow-matching models take 'euler', 'heun' or 'heun_final_euler'.)"
                )
            if guidance_interval is not None:
                raise ValueError("`guidance_interval` is not an argument for AFM models: they have no classifier-free "
                                 "guidance. (Flow-matching models take it.)")
            scheduler = self.scheduler
            if scheduler is not None and self.transformer.config.prediction_type == "sample":
                raise ValueError(
                    f"`scheduler`: this AFM generator predicts the sample itself (prediction_type='sample'), so it "
                    f"samples without a scheduler; got {type(scheduler).__name__}. Set `pipe.scheduler = None`."
                )
            if scheduler is not None and getattr(scheduler, "order", 1) != 1:
                raise ValueError(
                    f"`scheduler`: an AFM generator steps from s to t in one call, but {type(scheduler).__name__} calls "
                    f"the model {scheduler.order} times per step; allowed: a one-call scheduler such as "
                    "FlowMatchEulerDiscreteScheduler (the default) or FlowMapEulerDiscreteScheduler."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs`: {unknown} are not tensors this pipeline passes; "
                f"allowed: {self._callback_tensor_inputs}."
            )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Optional[ClassLabels] = None,
        num_inference_steps: Optional[int] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: Optional[int] = None,
        num_images_per_label: int = 1,
        callback_on_step_end: Union[Callable, PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        guidance_scale: Optional[float] = None,
        solver: Optional[str] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Generate `num_images_per_label` images per class label, or `batch_size` images from an
        unconditional model.

        Args:
            class_labels (`int`, `str`, or a list of them, or a tensor): class ids or class names; required
                for a class-conditional model, optional (class 0) for an unconditional one.
            num_inference_steps (`int`, *optional*): generator steps; defaults to the number the model was
                trained for (`transformer.config.nfe`, or 1 for an any-step model). For a flow-matching
                model, the scheduler's steps over [1, 0] (default 50; Heun evaluates the model twice per step).
            generator (`torch.Generator` or a list, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): the initial noise, shape `(batch, C, H, W)`, used as given
                (drawn noise is scaled by a model's `noise_scale`, given latents are not).
            output_type (`str`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`): return an `ImagePipelineOutput` rather than a tuple.
            batch_size (`int`, *optional*): images to draw from an unconditional model (`num_classes=1`);
                defaults to 1, or to the batch of `latents`.
            num_images_per_label (`int`, defaults to 1): images per label, each label repeated in a row
                (`[a, b]` with 2 gives `a, a, b, b`).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                called after each generator step as `callback_on_step_end(pipe, step_index, timestep,
                callback_kwargs)`, where `timestep` is the step's source time `s` (1 at the first step) and
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (the
                `latents` the step reached, float32); it returns a dict, whose `latents`, if present,
                replace them.
            callback_on_step_end_tensor_inputs (`List[str]`, defaults to `["latents"]`): the tensors passed
                to the callback; allowed: `pipe._callback_tensor_inputs`.
            guidance_scale (`float`, *optional*): flow-matching models only: the classifier-free guidance
                scale w in `v_null + w (v_c - v_null)` (default 1: no guidance). AFM models have no
                classifier-free guidance (a guided AFM model has the guidance trained in): any value
                raises a `ValueError`.
            solver (`str`, *optional*): flow-matching models only: sample this call with the scheduler of
                that name, made from `pipe.scheduler.config`: `"euler"` (`FlowMatchEulerDiscreteScheduler`),
                `"heun"` (`FlowHeunScheduler`, its corrector at every step) or `"heun_final_euler"`
                (`FlowHeunScheduler(final_euler_step=True)`: JiT's sampler). Default: the pipeline's
                `scheduler` (to change it for good, `pipe.scheduler = FlowHeunScheduler.from_config(pipe.scheduler.config)`).
            guidance_interval (`Tuple[float, float]`, *optional*): flow-matching models only: guide only at
                the flow times `t_low < t < t_high` (1 = noise; t = 1 included when `t_high` is 1), as
                JiT's CFG interval does (its `--interval_min 0.1 --interval_max 1.0` is `(0.0, 0.9)`);
                default: every step.
        """
        # 0. Check inputs before any work
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        flow_kwargs = {}
        if is_flow_model(self.transformer):  # the flow models' default step count, resolved before the checks
            num_inference_steps = DEFAULT_FLOW_STEPS if num_inference_steps is None else num_inference_steps
        self.check_inputs(output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_scale,
                          solver, num_inference_steps, guidance_interval)
        config = self.transformer.config
        trained_steps = allowed_num_inference_steps(config)
        if is_flow_model(self.transformer):
            # `solver` names a scheduler for this call (from the pipeline's scheduler's config); without
            # one (`pipe.scheduler = None`) a flow model takes its kind's default.
            scheduler = self.scheduler if solver is None else scheduler_for_solver(solver, self.scheduler and self.scheduler.config)
            flow_kwargs = dict(guidance_scale=1.0 if guidance_scale is None else float(guidance_scale),
                               guidance_interval=guidance_interval, scheduler=scheduler or default_scheduler(self.transformer))
        if num_inference_steps is None:
            num_inference_steps = trained_steps or 1
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if trained_steps is not None and num_inference_steps != trained_steps:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} is not supported: this model was trained for "
                f"{trained_steps}-step sampling ({config.prediction_type} prediction); allowed: {trained_steps}."
            )
        device = self._execution_device
        num_latents = latents.shape[0] if latents is not None else None
        class_ids = self._class_ids(class_labels, batch_size, num_images_per_label, num_latents, device)
        batch_size = class_ids.shape[0]
        if latents is not None:
            self._check_latents(latents, batch_size)
            latents = latents.to(device=device, dtype=torch.float32)
        else:
            latents = self.prepare_latents(batch_size, generator, device)

        # 1. Generator steps (one forward pass for a 1-NFE model), 2. decode; a captured CUDA graph
        #    (`enable_cuda_graph`) replays both at once for its batch size.
        graph = self._cuda_graph
        if (
            graph is not None
            and output_type != "latent"
            and num_inference_steps == 1
            and batch_size == graph.batch_size
            and callback_on_step_end is None
        ):
            image = graph(latents, class_ids)
        else:
            latents = self._denoise(
                latents, class_ids, num_inference_steps, callback_on_step_end, callback_on_step_end_tensor_inputs,
                **flow_kwargs,
            )
            image = latents if output_type == "latent" else self._decode(latents)
        if output_type != "latent":
            image = self.image_processor.postprocess(image.float(), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class _CUDAGraphSampler:
    """`fn(latents, class_ids)` captured as one CUDA graph over static input buffers of a fixed batch size."""

    def __init__(self, fn, latents: torch.Tensor, class_ids: torch.LongTensor, warmup: int = 2):
        self.batch_size = latents.shape[0]
        self.latents, self.class_ids = latents, class_ids
        # Warm up on a side stream, as capture requires: library handles and workspaces are created
        # here, outside the graph.
        stream = torch.cuda.Stream(latents.device)
        stream.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(self.latents, self.class_ids)
        torch.cuda.current_stream(latents.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(self.latents, self.class_ids)

    def __call__(self, latents: torch.Tensor, class_ids: torch.LongTensor) -> torch.Tensor:
        self.latents.copy_(latents)
        self.class_ids.copy_(class_ids)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output buffer


def class_grid(
    pipeline: AFMPipeline,
    num_rows: int = 10,
    per_class: int = 8,
    seed: int = 0,
    min_size: int = 64,
    gap: int = 4,
    label_rows: bool = False,
    **sample_kwargs,
):
    """A PIL grid with one row per class (up to `num_rows` classes, evenly spaced), from fixed noise.

    Images smaller than `min_size` (the 8x8 digits) are enlarged with nearest-neighbour, and a
    `gap` of white separates them, so the grid is readable. `label_rows` writes each row's class
    name (its first synonym in `id2label`, else the id) to its left. `sample_kwargs` go to the
    pipeline call (a flow model's `num_inference_steps`, `solver`, `guidance_scale`).
    """
    import PIL.Image
    import PIL.ImageDraw

    num_classes = pipeline.transformer.config.num_classes
    rows = min(num_classes, num_rows)
    classes = [i * num_classes // rows for i in range(rows)]
    images = pipeline(
        class_labels=classes, num_images_per_label=per_class, generator=torch.Generator().manual_seed(seed),
        output_type="pil", **sample_kwargs,
    ).images
    size = images[0].size[0]
    if size < min_size:
        scale = -(-min_size // size)
        images = [im.resize((size * scale, size * scale), resample=PIL.Image.NEAREST) for im in images]
    width, height = images[0].size
    names = [pipeline.id2label.get(c, str(c)).split(",")[0].strip() for c in classes] if label_rows else []
    draw = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    margin = max((int(draw.textlength(name)) + 2 * gap for name in names), default=0)
    grid = PIL.Image.new("RGB", (margin + per_class * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for k, image in enumerate(images):
        row, col = divmod(k, per_class)
        grid.paste(image.convert("RGB"), (margin + col * (width + gap), row * (height + gap)))
    draw = PIL.ImageDraw.Draw(grid)
    for row, name in enumerate(names):
        _, top, _, bottom = draw.textbbox((0, 0), name)
        draw.text((gap, row * (height + gap) + (height - top - bottom) // 2), name, fill="black")
    return grid

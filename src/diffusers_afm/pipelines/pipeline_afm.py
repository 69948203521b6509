"""`AFMPipeline`: class-conditional sampling from an Adversarial Flow Model.

A 1-NFE model is one generator forward pass from noise to a latent (or pixel) image, then the VAE
decode; multi-step and any-step models apply the step rule of `diffusers_afm.flow` N times.

Fast sampling on a GPU (docs/performance.md): load in bf16 (`dtype=torch.bfloat16`), put the VAE in
channels-last (`pipe.vae.to(memory_format=torch.channels_last)`), and for 1-NFE sampling at a fixed
batch size capture the whole sample as a CUDA graph with `pipe.enable_cuda_graph(batch_size)`.
"""

import difflib
import re
from typing import Dict, List, Optional, Union

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .. import flow
from ..models import AdversarialFlowTransformer2DModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ClassLabels = Union[int, str, List[Union[int, str]], torch.Tensor]


def _normalize_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def allowed_num_inference_steps(config) -> Optional[int]:
    """The step count a model supports: its trained `nfe`, or `None` (any) for an any-step model."""
    return config.nfe


class AFMPipeline(DiffusionPipeline):
    r"""
    One-step (or few-step) class-conditional image generation with an Adversarial Flow Model.

    Args:
        transformer ([`AdversarialFlowTransformer2DModel`]): the generator.
        vae ([`AutoencoderKL`], *optional*): decodes latents to images; `None` for a pixel-space model.
        id2label (`dict`, *optional*): class id -> name (comma-separated synonyms allowed, as in
            ImageNet's "tench, Tinca tinca"); stored in `model_index.json`, used to look labels up by name.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: AdversarialFlowTransformer2DModel,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
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

    def _class_ids(self, class_labels: ClassLabels, device: torch.device) -> torch.LongTensor:
        num_classes = self.transformer.config.num_classes
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
        return torch.tensor(ids, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ noise
    def _check_latents(self, latents: torch.Tensor, batch_size: int) -> None:
        config = self.transformer.config
        expected = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if tuple(latents.shape) != expected:
            raise ValueError(f"`latents` must have shape {expected} (batch, channels, height, width), got {tuple(latents.shape)}.")

    def prepare_latents(self, batch_size: int, generator, device: torch.device) -> torch.Tensor:
        """Initial noise `z`. Each sample draws from its own generator, so it is the same alone or in a batch.

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
        return torch.cat(noise).to(device)

    # ------------------------------------------------------------------ generate and decode
    def _denoise(self, latents: torch.Tensor, class_ids: torch.LongTensor, num_inference_steps: int) -> torch.Tensor:
        """The generator's steps from the noise `latents` (float32) to the final latents (float32)."""
        dtype = self.transformer.dtype

        def model_fn(x, s, t):
            return self.transformer(x.to(dtype), class_ids, s, t).sample.float()

        progress = self.progress_bar if num_inference_steps > 1 else None
        return flow.sample(model_fn, latents, num_inference_steps, self.transformer.config.prediction_type, progress)

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
        if allowed_num_inference_steps(config) not in (1, None):
            raise ValueError(f"`enable_cuda_graph` is for 1-step sampling; this model samples in {config.nfe} steps.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        self._cuda_graph = _CUDAGraphSampler(
            lambda latents, class_ids: self._decode(self._denoise(latents, class_ids, 1)),
            torch.zeros(shape, device=device),
            torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def disable_cuda_graph(self) -> None:
        self._cuda_graph = None

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        num_inference_steps: Optional[int] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Generate one image per class label.

        Args:
            class_labels (`int`, `str`, or a list of them, or a tensor): class ids or class names.
            num_inference_steps (`int`, *optional*): generator steps; defaults to the number the model was
                trained for (`transformer.config.nfe`, or 1 for an any-step model).
            generator (`torch.Generator` or a list, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): the initial noise, shape `(batch, C, H, W)`.
            output_type (`str`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`): return an `ImagePipelineOutput` rather than a tuple.
        """
        # 0. Check inputs before any work
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        config = self.transformer.config
        trained_steps = allowed_num_inference_steps(config)
        if num_inference_steps is None:
            num_inference_steps = trained_steps or 1
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if trained_steps is not None and num_inference_steps != trained_steps:
            raise ValueError(
                f"`num_inference_steps`={num_inference_steps} is not supported: this model was trained for "
                f"{trained_steps}-step sampling ({config.prediction_type} prediction); allowed: {trained_steps}."
            )
        device = self._execution_device
        class_ids = self._class_ids(class_labels, device)
        batch_size = class_ids.shape[0]
        if latents is not None:
            self._check_latents(latents, batch_size)
            latents = latents.to(device=device, dtype=torch.float32)
        else:
            latents = self.prepare_latents(batch_size, generator, device)

        # 1. Generator steps (one forward pass for a 1-NFE model), 2. decode; a captured CUDA graph
        #    (`enable_cuda_graph`) replays both at once for its batch size.
        graph = self._cuda_graph
        if graph is not None and output_type != "latent" and num_inference_steps == 1 and batch_size == graph.batch_size:
            image = graph(latents, class_ids)
        else:
            latents = self._denoise(latents, class_ids, num_inference_steps)
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
    pipeline: AFMPipeline, num_rows: int = 10, per_class: int = 8, seed: int = 0, min_size: int = 64, gap: int = 4
):
    """A PIL grid with one row per class (up to `num_rows` classes, evenly spaced), from fixed noise.

    Images smaller than `min_size` (the 8x8 digits) are enlarged with nearest-neighbour, and a
    `gap` of white separates them, so the grid is readable.
    """
    import PIL.Image

    num_classes = pipeline.transformer.config.num_classes
    rows = min(num_classes, num_rows)
    classes = [i * num_classes // rows for i in range(rows)]
    labels = [c for c in classes for _ in range(per_class)]
    images = pipeline(class_labels=labels, generator=torch.Generator().manual_seed(seed), output_type="pil").images
    size = images[0].size[0]
    if size < min_size:
        scale = -(-min_size // size)
        images = [im.resize((size * scale, size * scale), resample=PIL.Image.NEAREST) for im in images]
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (per_class * (width + gap) - gap, rows * (height + gap) - gap), "white")
    for k, image in enumerate(images):
        row, col = divmod(k, per_class)
        grid.paste(image.convert("RGB"), (col * (width + gap), row * (height + gap)))
    return grid

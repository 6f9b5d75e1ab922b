"""The sections of the settings tree (`[ingest]`, `[ingest.clean]`, `[model]`, `[train]`, `[eval]`, `[tune]`,
`[stack]`, `[registry]`, `[registry.gates]`, `[orchestration]`) and the platform's objective mixture `RECIPE`.
Every field's docstring is its documentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from wudao.model.config import GLMShape
from wudao.model.objective import GLMObjective


class CleanSettings(BaseModel):
    """Cleaning and quality thresholds (Gopher/C4 for English, WuDaoCorpora-style for Chinese)."""

    traditional_to_simplified: bool = True
    """Convert traditional Chinese to simplified (opencc t2s) so both scripts share one vocabulary."""
    scrub_pii: bool = True
    """Replace e-mail addresses, phone numbers and Chinese ID numbers with <EMAIL>, <PHONE>, <ID>."""
    keep_other_languages: bool = False
    """Keep documents that are neither Chinese nor English (tagged `other`); else quarantined as `low_quality`."""
    max_garbled_ratio: float = 0.001
    """Most mojibake hits (U+FFFD, 锟斤拷, Latin-1 debris) per character before a document counts as garbled."""
    zh_min_chars: int = 10
    """Fewest Chinese characters in a Chinese document (WuDaoCorpora drops paragraphs under 10)."""
    zh_min_han_ratio: float = 0.5
    """Smallest share of Chinese characters among non-space characters. WuDaoCorpora uses 0.7 for whole web
    pages; 0.5 keeps short factual text with Latin names and numbers."""
    en_min_words: int = 8
    """Fewest words in an English document. Gopher uses 50 for web pages; short factual documents are the point
    of the demo corpus, so the default is lower."""
    en_max_words: int = 100_000
    """Most words in an English document (Gopher)."""
    en_min_mean_word_length: float = 3.0
    """Gopher: mean word length between 3 and 10 characters."""
    en_max_mean_word_length: float = 10.0
    """Gopher: mean word length between 3 and 10 characters."""
    en_min_alpha_word_ratio: float = 0.8
    """Gopher: at least 80% of whitespace tokens contain a letter."""
    en_min_stop_words: int = 2
    """Gopher: at least two English stop words (the, be, to, of, and, that, have, with)."""
    en_max_symbol_word_ratio: float = 0.1
    """Gopher: at most one '#' or ellipsis per ten words."""
    en_min_terminal_punct_lines: float = 0.5
    """C4-style: share of lines that end in terminal punctuation (applied per document, not by dropping lines)."""
    en_reject_curly_braces: bool = True
    """C4: a '{' marks code or templates, not prose."""
    max_top_ngram_fraction: float = 0.2
    """Gopher: the most frequent word (character, for Chinese) bigram may cover at most this share of the text."""


class IngestSettings(BaseModel):
    """How raw objects become token shards."""

    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary trained on the first slice (then frozen)."""
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of each slice's documents kept aside (by a hash of the text) to measure forgetting."""
    shard_tokens: int = 8 * 1024 * 1024
    """Tokens per shard file before a new shard is started."""
    shard_images: int = 4096
    """Images per image shard (tar) before a new shard is started."""
    max_document_bytes: int = 8 * 1024 * 1024
    """A single document larger than this is quarantined as `too_large` instead of being read into memory."""
    image_size: int = 64
    """Side of the square RGB images stored in image shards (center crop, then resize)."""
    image_max_pixels: int = 50_000_000
    """Images declaring more pixels are refused as `image_too_large` before decoding (decompression bombs)."""
    batch_objects: int = 64
    """Most objects per batch task (the unit of retries and of parallelism in the ingest flow)."""
    batch_bytes: int = 8 * 1024 * 1024
    """About this much input per batch task (a larger single object makes a batch of its own). Small enough that
    batches spread evenly over workers (the last round leaves cores idle), large enough that the per-task overhead
    (a Prefect task run, a process hop) stays a few percent."""
    workers: int | None = Field(None, ge=1)
    """Worker processes that read, clean, MinHash and tokenize batches in parallel in `wudao ingest` (the ingest
    flow uses its task runner instead); each is one core's work and loads its own language models (~0.5 GB).
    None = one per core this process may use, as many as available memory holds (1 GB each); 1 = read in this
    process. The slice is the same whatever the number."""
    tokenizer_sample_bytes: int = 64 * 1024 * 1024
    """Text the first slice's tokenizer is trained on (the first documents up to this size)."""
    minhash_ngram_en: int = 5
    """Word n-grams for English MinHash (datatrove: 5)."""
    minhash_ngram_zh: int = 5
    """Character n-grams for Chinese MinHash."""
    minhash_bands: int = 14
    """LSH bands (datatrove: 14 x 8 = 112 permutations, Jaccard threshold about 0.72)."""
    minhash_rows: int = 8
    """Rows per LSH band."""
    clean: CleanSettings = CleanSettings()


class ModelSettings(GLMShape):
    """Shape of a GLM trained from scratch (a continued model keeps its parent's shape): every field of
    `wudao.model.config.GLMShape`, plus how many image codes follow the text vocabulary."""

    image_codebook_size: int = 256
    """Image code ids appended after the text vocabulary (the VQ-VAE's codebook size must match)."""


RECIPE = GLMObjective(token_prob=0.3, sentence_prob=0.0, mask_ratio=0.3)
"""The platform's objective mixture (bench/learning.py, bench/lifelong.py)."""
_FLAT_OBJECTIVE = ("token_prob", "sentence_prob", "mask_ratio")


class TrainSettings(BaseModel):
    """One continual pre-training run (recipe: Ibrahim et al. 2024 -- re-warm, re-decay, replay)."""

    steps: int = Field(1500, ge=1)
    """Optimizer steps per cycle. The default recipe (this and the model defaults) learns a demo slice's facts
    in about 3 minutes on 2 CPU cores (bench/learning.py, bench/lifelong.py)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per optimizer step across all processes (kept when the world size changes)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward pass on one process; gradient accumulation makes up the rest of batch_size."""
    seq_len: int = Field(64, ge=16)
    """Tokens per GLM sample (Part A + Part B; at most model.max_seq_len)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW), re-warmed at the start of every cycle."""
    warmup_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    """Share of the cycle's steps spent warming the LR up again (at least one step)."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Cosine decay ends at this share of the peak."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """`cosine` (re-warm + re-decay each cycle) or the "infinite" `constant` LR after warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay (GLM-10B: 0.1)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    replay_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """Share of text samples drawn from earlier slices (Ibrahim et al.: about 0.05 for a weak shift, 0.25 for a
    strong one). Slices of new facts are a strong shift: on the demo KG, 0.05 let slice 1's held-out loss rise
    1.76x over two more cycles, 0.25 kept it at its first value (tests/test_learning.py)."""
    slice_weights: dict[str, float] = {}
    """Relative replay weight of earlier slices by id (others weigh 1)."""
    image_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Share of steps that train on image-caption pairs (the image tokenizer is trained on first use)."""
    image_seq_len: int | None = Field(None, ge=16)
    """Tokens per image-caption row (None: seq_len). A row holds all the image's codes (64 for 8x8) plus its
    caption, so it needs more room than a text row; giving image steps their own length lets text steps stay
    short (and fast) instead of padding every text row to the image length."""
    vq_steps: int = Field(300, ge=1)
    """Steps of the VQ-VAE image tokenizer, trained once (then frozen, like the text tokenizer) by the first
    training with `image_ratio` > 0 whose slices hold images; `wudao train-vq` retrains it by hand."""
    vq_hidden: int = Field(32, ge=8)
    """Channels of the VQ-VAE's conv stages. On the demo scenes (64 px) 32 channels reconstruct better in 300 steps
    than 64 (pixel MSE 0.010 vs 0.029) at 2.6x less time; larger images and real photos want more."""
    objective: GLMObjective = Field(default_factory=lambda: RECIPE)
    """The blank-infilling mixture of text steps (`[train.objective]`, every field in wudao/data/objective.py).
    The recipe leans on document-level generation (token spans 0.3, sentence spans 0, mask ratio 0.3; GLM-10B:
    0.5 / 0.3 / 0.15): only Part B carries a loss, and on a small budget long blanks teach facts fastest."""
    seed: int = 1234
    """Seed for new weights and for data sampling (samples are a pure function of seed and index)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on a GPU that supports it, fp32 on CPU."""
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept per run; older ones are pruned."""
    spike_sigma: float = 6.0
    """Skip a step whose loss exceeds the recent mean by this many standard deviations."""
    spike_window: int = 20
    """Recent steps that define the mean and deviation for the spike guard."""
    max_skipped_in_row: int = 5
    """Abort with an error after this many skipped steps in a row."""
    threads: int = Field(0, ge=0)
    """torch intra-op threads; 0 leaves torch's default."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` replicates the model; `fsdp` (FSDP2) shards weights, gradients and optimizer state
    for models that do not fit one device."""
    expert_parallel: int = Field(1, ge=1)
    """Under torchrun with `ddp`: ranks per expert-parallel group. Each rank holds n_experts / expert_parallel
    experts of every MoE layer and tokens travel to their experts by all-to-all (FastMoE); 1 = every rank holds
    all experts. Must divide the ranks and `model.n_experts`. Checkpoints are full, so any value resumes any run."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for the MFU estimate (None: looked up for known GPUs, else no MFU)."""
    launcher: Literal["inprocess", "torchrun"] = "inprocess"
    """How the train flow runs a training: in its own process, or as `torchrun --standalone --nproc-per-node N
    wudao train` in a subprocess (GPU pods; torch never runs in a forked orchestration process)."""
    nproc_per_node: int = Field(1, ge=1)
    """Ranks per node with the torchrun launcher (the GPUs of the pod)."""

    @field_validator("objective", mode="before")
    @classmethod
    def _onto_recipe(cls, value: Any) -> Any:
        # A partial table (wudao.toml, WUDAO_TRAIN__OBJECTIVE__MASK_RATIO) changes what it names, not the rest.
        return {**RECIPE.model_dump(), **value} if isinstance(value, dict) else value

    @model_validator(mode="before")
    @classmethod
    def _flat_objective_keys(cls, data: Any) -> Any:
        # `train.token_prob` & co. from before the objective had its own table mean the same thing.
        if isinstance(data, dict) and any(k in data for k in _FLAT_OBJECTIVE):
            data = dict(data)
            flat = {k: data.pop(k) for k in _FLAT_OBJECTIVE if k in data}
            data["objective"] = {**flat, **(data.get("objective") or {})}
        return data


class EvalSettings(BaseModel):
    """What the evaluate stage measures besides held-out loss per slice."""

    kg_uri: str | None = None
    """KG folder (facts.jsonl + templates.jsonl; local or s3://) probed after every cycle; None = no KG check."""
    kg_limit: int | None = 200
    """Facts probed per cycle (a seeded sample; None = all)."""
    kg_claim_subjects: int = 20
    """Subjects whose generated text is claim-checked per cycle."""
    fid_coco_uri: str | None = None
    """MS-COCO root (`annotations/captions_<split>.json` + `<split>/` images; local or s3://) whose captions the
    candidate draws after every cycle for FID/KID; None = no FID in the cycle."""
    fid_weights_uri: str | None = None
    """Inception-v3 weights for FID/KID: a local path or s3:// URI (copied once under `$WUDAO_HOME/cache/fid`).
    The standard file is `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's GitHub release; torch-fidelity
    publishes the same weights as `weights-inception-2015-12-05-6726825d.pth`). Nothing is ever downloaded:
    None makes FID fail with that explanation. Env: WUDAO_EVAL__FID_WEIGHTS_URI."""
    fid_n: int = Field(30_000, ge=2)
    """Captions sampled (one per image; capped at the images the split has). CogView and DALL-E report 30,000;
    below 2048 the output warns that FID is biased (rank-deficient covariance)."""
    fid_split: str | None = None
    """COCO split, e.g. `val2014`; None = the only `captions_*.json` under annotations/ (the `val*` one if several)."""
    fid_real: Literal["captions", "split"] = "captions"
    """Real image set: `captions` = the images of the sampled captions; `split` = every image of the split."""
    fid_resolution: int | None = None
    """Side both image sets are brought to before Inception (real: center crop + bicubic resize; generated: resized
    if needed); None = ingest.image_size, the size the model draws at. CogView evaluates at 256."""
    fid_candidates: int = Field(1, ge=1)
    """Images sampled per caption; with more than one, CogView self-reranking keeps the best (CogView used 60)."""
    fid_blur_sigmas: list[float] = []
    """Also report CogView's FID-k on images Gaussian-blurred with these radii (PIL sigma), e.g. [1, 2, 4, 8];
    empty = plain FID only (each radius costs one more Inception pass per image)."""
    fid_seed: int = 0
    """Seed of the caption sample, of generation and of KID's subsets."""
    fid_batch_size: int = Field(32, ge=1)
    """Images per Inception forward pass and per VQ decode."""


class TuneSettings(BaseModel):
    """Adapting a trained model to a task with the model frozen (P-tuning) or not (fine-tuning): `wudao tune`."""

    method: Literal["ptuning", "ptuning-v1", "finetune"] = "ptuning"
    """`ptuning`: P-tuning v2, trained prefix keys/values in every layer (Liu et al. 2022); `ptuning-v1`: trained
    input embeddings of pseudo tokens before the text (Liu et al. 2021); `finetune`: every weight trained (the
    reference P-tuning is measured against; its adapter is a whole model)."""
    prompt_len: int = Field(8, ge=1, le=64)
    """Prefix entries per layer (v2) or pseudo tokens (v1). P-tuning v2 reports 20-100 for large models on hard
    tasks; a small model on a cloze task needs few, and each costs 2·d_model parameters per layer (v2)."""
    steps: int = Field(300, ge=1)
    """Optimizer steps (each on `batch_size` examples drawn with replacement from train.jsonl)."""
    batch_size: int = Field(16, ge=1)
    """Examples per step."""
    lr: float = Field(3e-2, gt=0)
    """Peak learning rate of the prompts. P-tuning v2 uses 5e-3 to 1e-2 on large models; a small model's prefix
    learned the continent task far faster at 3e-2 (the base of tests/test_tune.py, 300 steps: dev 0.88 at 3e-2,
    0.38 at 1e-2, zero-shot 0.44)."""
    finetune_lr: float = Field(1e-3, gt=0)
    """Peak learning rate of `finetune` (every weight; far lower, or the model forgets what it knew)."""
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the steps spent warming the LR up; then cosine decay to 0.1x."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay (0: decay would pull prompts towards zero, which means nothing for keys/values)."""
    reparam_hidden: int = Field(0, ge=0)
    """Width of the prompt reparameterisation MLP (P-tuning v1's prompt encoder, v2's prefix projection); 0 = the
    prompts are trained directly. The MLP's weights count as trainable and can exceed 1% of a small model."""
    max_new_tokens: int = Field(16, ge=1)
    """Generation tasks (`target` rows): tokens generated for the dev exact-match accuracy."""
    seed: int = 0
    """Seed of the prompt initialisation and of the batches (each step's batch is a function of seed and step)."""


class StackSettings(BaseModel):
    """The embedded one-machine stack started by `wudao stack up` (all services bind to 127.0.0.1)."""

    s3_port: int = 8333
    """SeaweedFS S3 API port."""
    master_port: int = 9333
    """SeaweedFS master port; its volume, filer and admin servers take the next three ports, and each also
    listens on its port + 10000 for gRPC."""
    mlflow_port: int = 5000
    """MLflow tracking server port."""
    prefect_port: int = 4200
    """Prefect API/UI port."""
    bucket: str = "wudao"
    """Bucket that holds every platform artefact, MLflow's included."""
    start_timeout_s: float = 120.0
    """How long `stack up` waits for each service's health check."""


class GateSettings(BaseModel):
    """Promotion gates: a candidate becomes `@champion` only when none fails (a gate without data is skipped)."""

    old_slice_tolerance: float = 0.02
    """Each earlier slice's held-out loss may be at most this fraction worse than the parent's (0.02 = 2%)."""
    require_new_slice_gain: bool = True
    """The new slice's held-out loss must be lower than the parent's on it (the cycle must learn something)."""
    kg_max_drop: float = 0.05
    """KG P@1 on the probed facts may fall at most this much below the parent's (absolute, same facts)."""
    fid_max_increase: float = 5.0
    """FID may rise at most this much above the parent's (same captions, N and weights)."""


class RegistrySettings(BaseModel):
    """Where runs and model versions are recorded."""

    experiment: str = "wudao-lifelong"
    """MLflow experiment that holds one parent run per cycle."""
    model_name: str = "wudao"
    """Registered model name; versions carry the aliases `candidate` and `champion`."""
    adapter_model_name: str = "wudao-adapters"
    """Registered model of tuned adapters (`wudao tune`); each version is tagged with the base version it was
    trained on (`wudao.base_model`, `wudao.base_version`) and serves the base plus the adapter."""
    gates: GateSettings = GateSettings()
    """What a candidate must pass to become `@champion` (each result is a version tag and a row of the gates table)."""


class OrchestrationSettings(BaseModel):
    """How the Prefect flows share the machine and retry I/O."""

    training_limit: str = "wudao-training"
    """Prefect global concurrency limit (1 slot) that every training holds: one training at a time, per server."""
    when_busy: Literal["wait", "refuse"] = "wait"
    """A training that finds the slot taken waits for it, or fails at once with a one-line reason."""
    busy_timeout_s: float | None = None
    """With `wait`: give up after this many seconds (None = wait as long as it takes)."""
    slot_lease_s: float = Field(60.0, ge=60.0)
    """Lease of the training slot, renewed while the training runs: a killed training frees the slot after at
    most this long (Prefect's minimum is 60 s)."""
    io_retries: int = 3
    """Retries of I/O tasks (object store, MLflow) after a transient failure, with the delays below."""
    io_retry_delays_s: list[float] = [5.0, 20.0, 60.0]
    """Backoff between I/O retries, in seconds."""
    result_prefix: str = "prefect-results"
    """Prefix (in the platform store) where flow and task results are persisted, so any worker can read them."""

"""Text and image generation from a trained GLM, with its tokenizer: what `wudao generate` and the MLflow
pyfunc model both call; and `mlflow models serve` of a version, for tests and benchmarks of the REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wudao.data.glm import SpecialIds, blank_prompt
from wudao.data.images import png_bytes
from wudao.data.multimodal import cogview_prompt
from wudao.model import VQVAE, GLMModel, Sampling, continue_text, fill_blank, rerank, sample_image_codes


@dataclass
class Generator:
    model: GLMModel
    tokenizer: object
    ids: SpecialIds

    @classmethod
    def create(cls, model: GLMModel, tokenizer) -> Generator:
        model.eval()
        return cls(model, tokenizer, SpecialIds.from_tokenizer(tokenizer))

    @torch.no_grad()
    def text(self, prompt: str, max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0) -> str:
        """Fill the first blank of a prompt with `[MASK]`/`[sMASK]`/`[gMASK]` (the blank replaced in the returned
        text), or continue a prompt without one."""
        gen = torch.Generator().manual_seed(seed)
        blank = blank_prompt(self.tokenizer, prompt, self.ids)
        if blank is None:
            ids = self.tokenizer.encode(prompt).ids
            return prompt + self.tokenizer.decode(
                continue_text(self.model, ids, self.ids, max_new_tokens, sampling, gen)
            )
        filled = fill_blank(
            self.model, blank.part_a, self.ids, max_new_tokens=max_new_tokens, sampling=sampling, generator=gen
        )[0]
        return blank.text(self.tokenizer.decode(filled))

    @torch.no_grad()
    def image_codes(
        self,
        caption: str,
        *,
        grid: int,
        codebook_size: int,
        candidates: int = 1,
        sampling: Sampling = Sampling(temperature=1.0, top_k=100),
        seed: int = 0,
    ) -> np.ndarray:
        """Codes (grid, grid) for a caption; with several candidates, CogView self-reranking keeps the one whose
        caption is most likely given the image."""
        offset = self.tokenizer.get_vocab_size()
        caption_ids = self.tokenizer.encode(caption).ids
        prompt = cogview_prompt(self.ids, offset, caption=caption_ids)
        codes = sample_image_codes(
            self.model,
            prompt,
            self.ids,
            n_codes=grid * grid,
            code_offset=offset,
            codebook_size=codebook_size,
            sampling=sampling,
            num_samples=candidates,
            generator=torch.Generator().manual_seed(seed),
        )
        best = 0
        if candidates > 1:
            prompts = [
                cogview_prompt(self.ids, offset, codes=c.numpy().reshape(grid, grid), image_first=True) for c in codes
            ]
            best, _ = rerank(self.model, prompts, caption_ids, self.ids)
        return codes[best].numpy().reshape(grid, grid)


@dataclass
class Painter:
    """Text -> image, the one way every caller draws (`wudao generate --image`, the served model, FID): the GLM
    samples a grid of image codes for each caption and the image tokenizer (VQ-VAE) decodes them."""

    generator: Generator
    vq: VQVAE
    image_size: int

    @property
    def grid(self) -> int:
        """Codes per side: the image size over the VQ-VAE's downsampling."""
        return self.image_size // 2**self.vq.cfg.n_down

    @torch.no_grad()
    def images(self, captions: list[str], seeds: list[int], candidates: int = 1) -> np.ndarray:
        """uint8 images (N, H, W, 3): one per caption, sampled with its seed (the codes one caption at a time, its
        candidates as a batch; the VQ-VAE decodes the whole batch)."""
        codes_NHW = np.stack(
            [
                self.generator.image_codes(
                    c, grid=self.grid, codebook_size=self.vq.cfg.codebook_size, candidates=candidates, seed=seed
                )
                for c, seed in zip(captions, seeds, strict=True)
            ]
        )
        images_NCHW = self.vq.decode(torch.from_numpy(codes_NHW))
        return (images_NCHW.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    def png(self, caption: str, candidates: int = 1, seed: int = 0) -> bytes:
        return png_bytes(self.images([caption], [seed], candidates)[0])


@contextlib.contextmanager
def mlflow_serve(
    model_uri: str, log: Path, env: dict[str, str] | None = None, port: int | None = None, timeout_s: float = 300.0
) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1:PORT (default: a free one) in its own
    process group, for as long as the block runs; yields the base URL once `/ping` answers. The server's output
    goes to `log`."""
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
        "-t",
        "600",
    ]
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"  # its uvicorn, ours
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout_s:.0f} s; see {log}")
            time.sleep(1)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):  # uvicorn's workers may linger
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                break


def invoke(url: str, inputs: list[str], params: dict, timeout_s: float = 600.0) -> list:
    """POST to a served model's /invocations; the predictions, or an error naming the HTTP status and message."""
    body = json.dumps({"inputs": inputs, "params": params}).encode()
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())["predictions"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None

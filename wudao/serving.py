"""Text and image generation from a trained GLM, with its tokenizer: what `wudao generate` and the MLflow
pyfunc model both call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wudao.data.glm import SpecialIds
from wudao.data.multimodal import cogview_prompt
from wudao.data.tokenizer import GMASK, MASK, SMASK
from wudao.model import GLMModel, Sampling, continue_text, fill_blank, rerank, sample_image_codes


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
        ids = self.tokenizer.encode(prompt).ids
        if not any(t in prompt for t in (MASK, SMASK, GMASK)):
            return prompt + self.tokenizer.decode(continue_text(self.model, ids, self.ids, max_new_tokens, sampling, gen))
        filled = fill_blank(self.model, ids, self.ids, max_new_tokens=max_new_tokens, sampling=sampling, generator=gen)[0]
        for token in (MASK, SMASK, GMASK):
            if token in prompt:
                before, _, after = prompt.partition(token)
                return before + self.tokenizer.decode(filled) + after
        return prompt

    @torch.no_grad()
    def image_codes(self, caption: str, *, grid: int, codebook_size: int, candidates: int = 1,
                    sampling: Sampling = Sampling(temperature=1.0, top_k=100), seed: int = 0) -> np.ndarray:  # fmt: skip
        """Codes (grid, grid) for a caption; with several candidates, CogView self-reranking keeps the one whose
        caption is most likely given the image."""
        offset = self.tokenizer.get_vocab_size()
        caption_ids = self.tokenizer.encode(caption).ids
        prompt = cogview_prompt(self.ids, offset, caption=caption_ids)
        codes = sample_image_codes(self.model, prompt, self.ids, n_codes=grid * grid, code_offset=offset,
                                   codebook_size=codebook_size, sampling=sampling, num_samples=candidates,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip
        best = 0
        if candidates > 1:
            prompts = [cogview_prompt(self.ids, offset, codes=c.numpy().reshape(grid, grid), image_first=True) for c in codes]
            best, _ = rerank(self.model, prompts, caption_ids, self.ids)
        return codes[best].numpy().reshape(grid, grid)

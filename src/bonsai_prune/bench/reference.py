"""The reference loop: sub-model evaluation written the way the original Bonsai code works
(fp32, one mask at a time, masks in Python hooks, the LM head at every position; for U†,
one prompt at a time), the baseline the project's path is measured against."""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_perplexity(model, batch, utility=None) -> float:
    """-mean NLL of solution tokens, the original way: full-vocabulary logits at every position.
    ``utility`` is unused: every reference scorer takes ``(model, batch, utility)``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = torch.roll(batch.input_ids, -1, dims=1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    per_problem = (nll * batch.target_mask).sum(1) / batch.target_mask.sum(1)
    return -float(per_problem.mean())


@torch.no_grad()
def reference_generate(
    model, tokenizer, prompt_ids: torch.Tensor, n_new: int, stop: str = "none"
) -> tuple[str, int, bool]:
    """Greedy decoding of one prompt with logits over the whole vocabulary at every position:
    (text, tokens generated, whether it ended by itself)."""
    from bonsai_prune.core.metrics import STOP_PATTERNS
    from bonsai_prune.models.decoding import cache_keyword

    pattern = STOP_PATTERNS[stop]
    keyword = cache_keyword(model)
    output = model(input_ids=prompt_ids, use_cache=True)
    cache, tokens = output[keyword], []
    for _ in range(n_new):
        token = output.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        if int(token) == tokenizer.eos_token_id:
            return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), True
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if pattern is not None and pattern.search(text):
            return text, len(tokens), True
        output = model(input_ids=token, use_cache=True, **{keyword: cache})
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), False


def reference_u_dagger(model, batch, utility) -> float:
    from bonsai_prune.utility.base import answer_probability
    from bonsai_prune.utility.generation import Generated

    rows = []
    for row in range(batch.prompt_ids.shape[0]):
        ids = batch.prompt_ids[row : row + 1][:, batch.prompt_attention_mask[row].bool()]
        config = utility.config
        rows.append(reference_generate(model, batch.tokenizer, ids, config.gen_tokens, config.stop))
    texts, counts, finished = (list(column) for column in zip(*rows, strict=True))
    generated = Generated(texts, [[] for _ in texts], counts, finished)
    probs = answer_probability(model, batch) if utility.config.weights["prob"] > 0 else None
    return utility.score_generated(batch, generated, probs)

"""summary.json's figures: each caption's and failure's counts (tokens paid, retries, stages
and types) and the summary made of their sums, with the cost at the run's prices.
"""

from __future__ import annotations

from beam_caption.core.records import caption_retries


def caption_counts(element: dict, image_key: str) -> dict:
    """A caption's figures: its answers' tokens (every answered attempt) count in tokens and
    cost, unless it came from the cache."""
    meta = element["caption_meta"]
    images = element.get(image_key)
    tokens = (meta["prompt_tokens"] or 0) + (meta["completion_tokens"] or 0)
    counts = {"captioned": 1, "images": len(images) if isinstance(images, list) else 1,
              "attempts": meta["attempts"], "retries": caption_retries(meta)}
    rejected = meta.get("rejected")
    if isinstance(rejected, dict):
        counts.update({f"rejected:{kind}": number for kind, number in rejected.items()
                       if isinstance(number, int)})
    if meta.get("cached"):
        counts.update(cache_hits=1, tokens_saved=tokens)
    else:
        counts.update(prompt_tokens=meta["prompt_tokens"] or 0,
                      completion_tokens=meta["completion_tokens"] or 0,
                      reasoning_tokens=meta.get("reasoning_tokens") or 0,
                      cached_tokens=meta.get("cached_tokens") or 0,
                      usage_estimated=1 if meta.get("usage_estimated") else 0)
        counts.update(_model_counts(meta.get("tokens_by_model")))
        if meta.get("batch_id"):  # at the batch price
            counts.update(batch_prompt_tokens=meta["prompt_tokens"] or 0,
                          batch_completion_tokens=meta["completion_tokens"] or 0,
                          batch_cached_tokens=counts["cached_tokens"])
    return counts


def failure_counts(element: dict) -> dict:
    """A failure's figures: what its answered attempts paid (``error.paid``) counts in tokens
    and cost as a caption's does."""
    error = element["error"]
    counts = {"failed": 1, "attempts": error["attempts"],
              "retries": max(error["attempts"] - 1, 0),
              f"stage:{error['stage']}": 1, f"type:{error['stage']}/{error['type']}": 1}
    paid = error.get("paid")
    if isinstance(paid, dict):  # none in failure lines of earlier versions
        counts.update(prompt_tokens=paid.get("prompt_tokens") or 0,
                      completion_tokens=paid.get("completion_tokens") or 0,
                      cached_tokens=paid.get("cached_tokens") or 0,
                      usage_estimated=1 if paid.get("estimated") else 0)
        counts.update(_model_counts(paid.get("by_model")))
        if paid.get("batch"):  # at the batch price
            counts.update(batch_prompt_tokens=counts["prompt_tokens"],
                          batch_completion_tokens=counts["completion_tokens"],
                          batch_cached_tokens=counts["cached_tokens"])
    return counts


def _model_counts(tokens_by_model) -> dict:
    """The counts of a record's tokens per model (``caption_meta.tokens_by_model``, a
    failure's ``error.paid.by_model``): ``model_prompt_tokens:MODEL`` and
    ``model_completion_tokens:MODEL``."""
    if not isinstance(tokens_by_model, dict):
        return {}
    return {f"model_{side}_tokens:{model}": tokens[f"{side}_tokens"]
            for model, tokens in tokens_by_model.items() if isinstance(tokens, dict)
            for side in ("prompt", "completion")
            if isinstance(tokens.get(f"{side}_tokens"), int)}


def summary_from_counts(counts: dict, options: dict, wall_time_s: float | None = None,
                        output_keys: list[str] | None = None) -> dict:
    """The summary.json document from the combined counts; ``wall_time_s`` from the job's start
    to now (when the summary is written, after the last record); ``output_keys`` the fields
    that hold answers (default: --output_key's)."""
    captioned, failed = counts.get("captioned", 0), counts.get("failed", 0)
    images = counts.get("images", 0)
    return {
        "records": captioned + failed,
        "captioned": captioned,
        "failed": failed,
        "images_captioned": images,
        "resumed": counts.get("resumed", 0),
        "set_aside": counts.get("set_aside", 0),
        "failed_by_stage": {k[6:]: v for k, v in sorted(counts.items()) if k.startswith("stage:")},
        "failed_by_type": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("type:")},
        # answers an answer check refused and a retry replaced, by check (response/TYPE)
        "answers_rejected": {k[9:]: v for k, v in sorted(counts.items())
                             if k.startswith("rejected:")},
        "cache_hits": counts.get("cache_hits", 0),
        "tokens_saved_by_cache": counts.get("tokens_saved", 0),
        "attempts": counts.get("attempts", 0),
        "retries": counts.get("retries", 0),
        "tokens": {"prompt": counts.get("prompt_tokens", 0),
                   "completion": counts.get("completion_tokens", 0),
                   "total": counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0),
                   "reasoning": counts.get("reasoning_tokens", 0),
                   # of the prompt tokens, those served from the server's prefix cache
                   "cached": counts.get("cached_tokens", 0)},
        "cached_share": (round(counts.get("cached_tokens", 0) / counts["prompt_tokens"], 4)
                         if counts.get("prompt_tokens") else None),
        # records whose tokens include the worst case charged for answers without usage
        "usage_estimated": counts.get("usage_estimated", 0),
        "cost": _cost(counts, options),
        "throttled_s": counts.get("throttled_ms", 0) / 1000,
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 3),
        "images_per_s": round(images / wall_time_s, 2) if wall_time_s else None,
        "output_keys": output_keys or [options.get("output_key") or "caption"],
        "options": options,
    }


def _cost(counts: dict, options: dict) -> dict:
    """Dollars at the run's --price_per_million_* (0 without prices), Batch API answers at
    --batch_discount of them; cached prompt tokens at --price_per_million_cached_input_tokens
    when given (else as other input tokens)."""
    discount = options.get("batch_discount")
    discount = 0.5 if discount is None else discount
    spent = {side: (counts.get(f"{tokens}_tokens", 0) - counts.get(f"batch_{tokens}_tokens", 0)
                    * (1 - discount))
             * (options.get(f"price_per_million_{side}_tokens") or 0) / 1e6
             for side, tokens in (("input", "prompt"), ("output", "completion"))}
    cached_price = options.get("price_per_million_cached_input_tokens")
    if cached_price is not None:
        spent["input"] -= ((counts.get("cached_tokens", 0)
                            - counts.get("batch_cached_tokens", 0) * (1 - discount))
                           * ((options.get("price_per_million_input_tokens") or 0)
                              - cached_price) / 1e6)
    by_model = _cost_by_model(counts, options)
    if by_model:  # the tokens of the other models, priced at their prices
        for model, dollars in by_model.items():
            if model != options.get("model"):
                tokens = {side: counts.get(f"model_{side}_tokens:{model}", 0)
                          for side in ("prompt", "completion")}
                spent["input"] += dollars["input"] - tokens["prompt"] * (
                    options.get("price_per_million_input_tokens") or 0) / 1e6
                spent["output"] += dollars["output"] - tokens["completion"] * (
                    options.get("price_per_million_output_tokens") or 0) / 1e6
    cost = {**{side: round(value, 6) for side, value in spent.items()},
            "total": round(sum(spent.values()), 6)}
    return {**cost, "by_model": by_model} if by_model else cost


def _cost_by_model(counts: dict, options: dict) -> dict:
    """Dollars per model when prompts were asked of other models than --model (none else):
    each model's tokens at its prices (``options["model_prices"]``: model -> [input, output]
    per million tokens; the job's prices for a model without), the job's model the rest."""
    models = sorted({key.split(":", 1)[1] for key in counts if key.startswith("model_")})
    if not models:
        return {}
    prices = options.get("model_prices") or {}
    job_model = options.get("model")
    job_prices = [options.get("price_per_million_input_tokens") or 0,
                  options.get("price_per_million_output_tokens") or 0]
    tokens = {model: [counts.get(f"model_{side}_tokens:{model}", 0)
                      for side in ("prompt", "completion")] for model in models}
    rest = [counts.get(f"{side}_tokens", 0) - sum(t[i] for m, t in tokens.items()
                                                  if m != job_model)
            for i, side in enumerate(("prompt", "completion"))]
    tokens[job_model] = rest
    by_model = {}
    for model, (prompt, completion) in tokens.items():
        price_in, price_out = prices.get(model) or job_prices
        dollars = {"input": prompt * price_in / 1e6, "output": completion * price_out / 1e6}
        by_model[model] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           **{side: round(value, 6) for side, value in dollars.items()},
                           "total": round(sum(dollars.values()), 6)}
    return dict(sorted(by_model.items()))

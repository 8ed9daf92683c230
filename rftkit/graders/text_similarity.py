"""The `string_check` and `text_similarity` graders: text against a reference, through well-kept libraries.

    string_check("ilike", "The capital is Paris", "paris")            # 1.0
    similarity("rouge_l", "the cat sat", "the cat sat down")          # F-measure in [0, 1]

string_check: eq / ne (case-sensitive equality, inequality), like / ilike (the input contains the reference,
case-sensitive / not), 1.0 or 0.0, as OpenAI defines them.

text_similarity metrics, each in [0, 1]:
  fuzzy_match  rapidfuzz `fuzz.WRatio` with `utils.default_process`, / 100 (what OpenAI's own fuzzy grader
               example in its graders guide computes)
  bleu         sacrebleu sentence BLEU, / 100
  gleu         NLTK's sentence GLEU (Google BLEU) on whitespace tokens
  meteor       NLTK's METEOR on whitespace tokens; needs NLTK's WordNet data (`python -m nltk.downloader
               wordnet`), checked when the grader loads
  rouge_1..5, rouge_l   rouge-score's F-measure (stemming on)
  cosine       cosine of the two texts' embeddings, through the judge endpoint's /v1/embeddings
               (rftkit.graders.score_model.embed); RFTKIT_EMBEDDING_MODEL picks the model
"""
from __future__ import annotations

import functools

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
           "rouge_5", "rouge_l")


def string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.lower() in text.lower())
    raise ValueError(f"string_check operation must be one of {OPERATIONS}, got {operation!r}")


def check_metric(metric: str) -> None:
    """Raise now (when the grader loads) for a metric this install cannot compute."""
    if metric not in METRICS:
        raise ValueError(f"evaluation_metric must be one of {METRICS}, got {metric!r}")
    if metric == "meteor":
        import nltk
        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            try:
                nltk.data.find("corpora/wordnet.zip")
            except LookupError:
                raise ValueError("evaluation_metric 'meteor' needs NLTK's WordNet data, which is not installed: "
                                 "run `python -m nltk.downloader wordnet` once") from None


@functools.lru_cache(maxsize=None)
def _rouge(kind: str):
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def similarity(metric: str, text: str, reference: str) -> float:
    """The metric's score of `text` against `reference` (cosine excepted: it needs an endpoint)."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils
        return fuzz.WRatio(text, reference, processor=utils.default_process) / 100.0
    if metric == "bleu":
        import sacrebleu
        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu
        return float(sentence_gleu([reference.split()], text.split()))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score
        return float(meteor_score([reference.split()], text.split()))
    if metric.startswith("rouge_"):
        kind = "rougeL" if metric == "rouge_l" else "rouge" + metric[-1]
        return float(_rouge(kind).score(reference, text)[kind].fmeasure)
    raise ValueError(f"evaluation_metric {metric!r} is not computed locally (one of {METRICS})")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = sum(x * x for x in a) ** 0.5, sum(y * y for y in b) ** 0.5
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity of a zero embedding is undefined")
    return dot / (na * nb)

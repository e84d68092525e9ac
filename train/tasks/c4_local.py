"""The functions of lm-eval's own `c4` task, for c4_local.yaml (lm-eval resolves ``!function`` beside the YAML).

``c4_detokenizer`` undoes wikitext-style tokenisation (" , " -> ", " and the like; C4 text is rarely
affected); ``process_results`` counts the bytes and words of the original ``doc["text"]``.
"""
from lm_eval.tasks.c4.preprocess_c4 import c4_detokenizer, process_results

__all__ = ["c4_detokenizer", "process_results"]

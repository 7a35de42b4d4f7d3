"""M1 · basic: attention over a contiguous KV cache, and the sampler's filters and
penalties."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m1.1", "attention over the KV cache: write, then attend",
        ("attention/layer.py::Attention.forward",),
        "medium",
        "The KV cache is why a decode step costs one token's work: each pass stores only the "
        "new tokens' keys and values and attends over everything stored so far.",
        "The new tokens sit at positions start_pos .. end - 1: write k, v into k_cache and\n"
        "v_cache there. Query i (position start_pos + i) sees keys 0 .. start_pos + i, so the\n"
        "mask over keys [0, end) is a tril offset by start_pos. Use scaled_dot_product_attention\n"
        "on [heads, T, d] views with enable_gqa=True; return [T, heads * d]."),
    Exercise(
        "m1.2", "top-p: keep the smallest set that reaches p",
        ("model_executor/layers/sampler.py::top_p_mask",),
        "medium",
        "Nucleus sampling cuts the long tail of unlikely tokens, whose number changes with "
        "how sure the model is, while keeping every plausible one.",
        "Sort each row descending, softmax, and take the probability of the tokens ranked\n"
        "above each one (cumsum - probs). A token whose mass before is >= top_p goes (-inf);\n"
        "the first always stays. Scatter the sorted decision back to vocabulary order."),
    Exercise(
        "m1.3", "repetition, presence and frequency penalties",
        ("model_executor/layers/sampler.py::apply_penalties",),
        "medium",
        "Penalties read the sequence's own history (its prompt and output) to push the model "
        "away from repeating itself, the one part of sampling that depends on the past.",
        "Per row i, repetition_penalty r != 1 first: each distinct token of prompt + output,\n"
        "once: a logit > 0 is divided by r, else multiplied by r. Then over output tokens only:\n"
        "subtract frequency_penalty * count and presence_penalty * (count > 0). In place."),
    Exercise(
        "m1.4", "top-k and min-p: two simpler filters",
        ("model_executor/layers/sampler.py::top_k_mask",
         "model_executor/layers/sampler.py::min_p_mask"),
        "easy",
        "Top-k keeps a fixed number of candidates, min-p those close enough to the most "
        "likely one: with top-p they decide which tokens a random draw may pick.",
        "top_k: k <= 0 means the whole vocabulary, k is at most the vocabulary; a logit below\n"
        "the row's k-th largest goes to -inf (ties with the k-th stay). min_p: softmax; a token\n"
        "whose probability is below min_p * the row's largest probability goes to -inf."),
]

"""The sampler: masks, temperature, penalties, min_tokens and seeds, checked exactly.

Introduced in M1 (issue 2). Runs on `model_executor/layers/sampler.py` of every stage
that generates, on hand-made logits, and on `LLM.generate` with a tiny dummy model for
the seed behaviour.
"""

import importlib
import math

import pytest
import torch

from conftest import load_stage, stages_with

GENERATE_STAGES = stages_with("generate")
NEG_INF = float("-inf")

# Chi-square critical values at p = 0.001 (upper tail), by degrees of freedom.
CHI2_CRITICAL_0001 = {3: 16.266, 4: 18.467, 5: 20.515, 7: 24.322}


def sampler_module(stage: str):
    return importlib.import_module(f"{stage}.model_executor.layers.sampler")


def row(stage, prompt=(), output=(), generator=None, blocked=(), **params):
    mod = sampler_module(stage)
    sp = load_stage(stage).SamplingParams(**params)
    return mod.SamplingRow(sp, list(prompt), list(output), generator, list(blocked))


def kept(masked: torch.Tensor) -> list[list[int]]:
    """Indices of the entries left finite, per row."""
    return [torch.nonzero(torch.isfinite(r)).flatten().tolist() for r in masked]


def assert_mask(original, masked, expected_kept):
    assert kept(masked) == expected_kept
    finite = torch.isfinite(masked)
    assert torch.equal(masked[finite], original[finite]), "kept logits must not change"
    assert bool((masked[~finite] == NEG_INF).all())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_top_k_mask(stage):
    mod = sampler_module(stage)
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0],
                           [0.5, -1.0, 2.0, 0.0, 9.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0]])
    top_k = torch.tensor([2, 1, -1, 0, 99])
    masked = mod.top_k_mask(logits.clone(), top_k)
    assert_mask(logits, masked, [[1, 3], [4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4],
                                 [0, 1, 2, 3, 4]])


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_top_p_mask(stage):
    mod = sampler_module(stage)
    # probabilities 0.05, 0.5, 0.15, 0.3 (deliberately not in sorted order)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(6, 1)
    top_p = torch.tensor([0.1, 0.5, 0.75, 0.9, 0.97, 1.0])
    masked = mod.top_p_mask(logits.clone(), top_p)
    assert_mask(logits, masked, [
        [1],            # 0.5 alone reaches 0.1
        [1],            # 0.5 reaches 0.5
        [1, 3],         # 0.5 + 0.3 = 0.8 reaches 0.75
        [1, 2, 3],      # + 0.15 = 0.95 reaches 0.9
        [0, 1, 2, 3],   # needs all four
        [0, 1, 2, 3],   # top_p = 1 keeps everything
    ])


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_top_p_of_one_keeps_tokens_whose_mass_rounds_away(stage):
    mod = sampler_module(stage)
    # float32 cumulative sums reach 1.0 before the least likely tokens (here about 1e-9
    # each): top_p = 1 must still keep them, top_p just below 1 may drop them
    logits = torch.tensor([[0.0, -21.0, -21.0, -21.0, 2.0]] * 2)
    masked = mod.top_p_mask(logits.clone(), torch.tensor([1.0, 0.999]))
    assert_mask(logits, masked, [[0, 1, 2, 3, 4], [0, 4]])


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_min_p_mask(stage):
    mod = sampler_module(stage)
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log().repeat(4, 1)
    min_p = torch.tensor([0.0, 0.3, 0.6, 1.0])  # thresholds 0, 0.12, 0.24, 0.4
    masked = mod.min_p_mask(logits.clone(), min_p)
    assert_mask(logits, masked, [[0, 1, 2, 3], [1, 2, 3], [1, 3], [1]])


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_masks_apply_per_row_in_a_batch(stage):
    """Rows with different settings in one batch each get their own mask."""
    mod = sampler_module(stage)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 0.0, 3.0]])
    assert kept(mod.top_k_mask(logits.clone(), torch.tensor([1, 3]))) == [[1], [0, 1, 3]]


# --- penalties and min_tokens ----------------------------------------------------------

@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_repetition_penalty_formula(stage):
    mod = sampler_module(stage)
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0, 0.5]])
    r = row(stage, prompt=[0, 1], output=[1, 3], repetition_penalty=2.0)
    out = mod.apply_penalties(logits.clone(), [r])
    # seen = {0, 1, 3} over prompt + output: positive / 2, negative * 2; others untouched
    expected = torch.tensor([[1.0, -4.0, 1.0, -2.0, 3.0, 0.5]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_presence_and_frequency_penalty_formula(stage):
    mod = sampler_module(stage)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    # token 2 three times and token 4 once in the output; token 0 only in the prompt
    r = row(stage, prompt=[0, 0], output=[2, 4, 2, 2], presence_penalty=0.5,
            frequency_penalty=0.25)
    out = mod.apply_penalties(logits.clone(), [r])
    expected = torch.tensor([[1.0, 1.0, 1.0 - 0.5 - 3 * 0.25, 1.0, 1.0 - 0.5 - 0.25]])
    assert torch.allclose(out, expected)
    # negative values reward repetition instead
    r = row(stage, output=[3, 3], presence_penalty=-1.0, frequency_penalty=-0.5)
    out = mod.apply_penalties(logits.clone(), [r])
    assert torch.allclose(out, torch.tensor([[1.0, 1.0, 1.0, 3.0, 1.0]]))


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_penalties_only_touch_their_row(stage):
    mod = sampler_module(stage)
    logits = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    rows = [row(stage, output=[1], repetition_penalty=2.0, presence_penalty=1.0),
            row(stage, output=[1])]
    out = mod.apply_penalties(logits.clone(), rows)
    assert torch.allclose(out, torch.tensor([[2.0, 0.0, 2.0], [2.0, 2.0, 2.0]]))


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_min_tokens_blocks_tokens_until_reached(stage):
    mod = sampler_module(stage)
    logits = torch.zeros(2, 6)
    rows = [row(stage, output=[5, 5], blocked=[2, 4], min_tokens=3, max_tokens=8),
            row(stage, output=[5, 5, 5], blocked=[2, 4], min_tokens=3, max_tokens=8)]
    out = mod.apply_min_tokens(logits.clone(), rows)
    assert kept(out) == [[0, 1, 3, 5], [0, 1, 2, 3, 4, 5]]


# --- the sampler -----------------------------------------------------------------------

def draw(stage, logits_row: torch.Tensor, n: int, seed: int = 0, **params) -> torch.Tensor:
    """n samples of one distribution, as a batch of n identical rows."""
    mod = sampler_module(stage)
    sampler = mod.Sampler(seed=seed)
    rows = [row(stage, **params) for _ in range(n)]
    return sampler(logits_row.repeat(n, 1), rows)


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_temperature_sampling_frequencies_match_softmax(stage):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    n, temperature = 20000, 0.7
    tokens = draw(stage, logits, n, seed=1234, temperature=temperature)
    counts = torch.bincount(tokens, minlength=6).double()
    probs = torch.softmax(logits.double() / temperature, dim=0)
    stat = chi_square(counts, probs)
    assert stat < CHI2_CRITICAL_0001[5], f"chi-square {stat:.1f} against softmax(logits / T)"
    # The test has power: the same counts are far from the untempered softmax.
    wrong = chi_square(counts, torch.softmax(logits.double(), dim=0))
    assert wrong > 10 * CHI2_CRITICAL_0001[5]


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_top_k_sampling_frequencies_match_renormalized_softmax(stage):
    logits = torch.tensor([0.3, 1.2, -0.4, 0.9, 0.0, 1.5])
    n = 20000
    tokens = draw(stage, logits, n, seed=99, temperature=1.0, top_k=4)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[2] == 0 and counts[4] == 0  # outside the top 4
    keep = [0, 1, 3, 5]
    probs = torch.softmax(logits.double()[keep], dim=0)
    assert chi_square(counts[keep], probs) < CHI2_CRITICAL_0001[3]


@pytest.mark.parametrize("stage", GENERATE_STAGES)
@pytest.mark.parametrize("params, allowed", [
    # probabilities at T=1.5: .195 .182 .171 .160 .149 .004 .140
    (dict(top_p=0.5), {0, 1, 2}),  # .195 + .182 < 0.5 <= .195 + .182 + .171
    (dict(min_p=0.9), {0, 1}),  # .182 / .195 = 0.94 >= 0.9 > .171 / .195 = 0.88
    (dict(top_k=4, min_p=0.85), {0, 1, 2}),  # min_p cuts deeper than top_k here
    (dict(top_k=2, top_p=0.9), {0, 1}),  # top_k cuts deeper than top_p here
])
def test_sampling_never_picks_a_masked_token(stage, params, allowed):
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, -5.0, 0.5])
    tokens = draw(stage, logits, 2000, seed=5, temperature=1.5, **params)
    assert set(tokens.tolist()) == allowed  # nothing outside, and every allowed token seen


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_greedy_is_argmax_after_penalties(stage):
    mod = sampler_module(stage)
    logits = torch.tensor([[3.0, 2.9, 0.0, 1.0]])
    assert mod.Sampler()(logits.clone(), [row(stage, temperature=0)]).tolist() == [0]
    penalized = row(stage, output=[0], temperature=0, repetition_penalty=1.2)
    assert mod.Sampler()(logits.clone(), [penalized]).tolist() == [1]  # 3.0 / 1.2 < 2.9


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_greedy_rows_unaffected_by_sampling_rows(stage):
    mod = sampler_module(stage)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    params = [dict(temperature=0), dict(temperature=1.3, top_k=5),
              dict(temperature=0, presence_penalty=1.0), dict(temperature=0.8, top_p=0.5),
              dict(temperature=0), dict(temperature=2.0, min_p=0.1)]
    outputs = [[int(logits[i].argmax())] for i in range(6)]
    rows = [row(stage, output=out, **p) for out, p in zip(outputs, params)]
    tokens = mod.Sampler(seed=3)(logits.clone(), rows).tolist()
    for i in (0, 4):
        assert tokens[i] == int(logits[i].argmax())
    assert tokens[2] == int(mod.apply_penalties(logits[2:3].clone(), [rows[2]]).argmax())
    alone = [mod.Sampler(seed=7)(logits[i:i + 1].clone(), [rows[i]]).item() for i in (0, 2, 4)]
    assert alone == [tokens[0], tokens[2], tokens[4]]


@pytest.mark.parametrize("stage", stages_with("flash_attn"))
def test_bf16_logits_sample_as_their_fp32_copy(stage):
    """M4 on: the model's logits come in its dtype (bf16 on a GPU) and the sampler goes to
    fp32 only where it computes. Greedy, penalized, min_tokens, seeded and unseeded rows
    give the tokens of the same logits copied to fp32 first (bf16 -> fp32 is exact), and
    an all-greedy batch takes its argmax on the bf16 table itself."""
    mod = sampler_module(stage)
    g = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(6, 40, generator=g)).bfloat16()

    def rows():
        return [row(stage, temperature=0),
                row(stage, prompt=[1, 2], output=[3, 3], temperature=0,
                    repetition_penalty=1.3, frequency_penalty=0.5),
                row(stage, output=[4], blocked=[int(logits[2].float().argmax())],
                    temperature=0, min_tokens=3),
                row(stage, temperature=0.8, top_p=0.9, seed=5,
                    generator=torch.Generator().manual_seed(5)),
                row(stage, temperature=1.1, top_k=7, min_p=0.05),
                row(stage, output=[7, 8], temperature=0.7, presence_penalty=0.4)]

    got = mod.Sampler(seed=3)(logits.clone(), rows())
    want = mod.Sampler(seed=3)(logits.float(), rows())
    assert torch.equal(got, want)
    greedy = [row(stage, temperature=0) for _ in range(6)]
    assert torch.equal(mod.Sampler()(logits.clone(), greedy), logits.float().argmax(-1))
    # a penalty smaller than bf16's step at 1.0: 1.0078125 - 0.005 is still the larger in
    # fp32, but would round to a tie with 1.0 (and lose it) in bf16
    close = torch.tensor([[1.0, 1.0078125, -4.0]]).bfloat16()
    penalized = row(stage, output=[1], temperature=0, frequency_penalty=0.005)
    assert mod.Sampler()(close, [penalized]).tolist() == [1]


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_seeded_row_ignores_its_batch_neighbours(stage):
    mod = sampler_module(stage)
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the random draw only
    def seeded():
        return row(stage, generator=torch.Generator().manual_seed(42), temperature=1.0)
    alone = mod.Sampler(seed=0)(logits.clone(), [seeded()]).item()
    batch = torch.zeros(3, 1000)
    others = [row(stage, temperature=1.0), seeded(), row(stage, temperature=1.0)]
    in_batch = mod.Sampler(seed=1)(batch, others)[1].item()
    assert alone == in_batch
    different = mod.Sampler(seed=0)(logits.clone(), [
        row(stage, generator=torch.Generator().manual_seed(43), temperature=1.0)]).item()
    assert different != alone


# --- seeds through LLM.generate --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llms():
    return {stage: load_stage(stage).LLM("dummy:tiny-llama", device="cpu")
            for stage in GENERATE_STAGES}


@pytest.mark.parametrize("stage", GENERATE_STAGES)
def test_same_seed_same_text(stage, tiny_llms):
    llm = tiny_llms[stage]
    SamplingParams = load_stage(stage).SamplingParams

    def sample(seed, prompt="Hello there"):
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=seed,
                                ignore_eos=True)
        return llm.generate(prompt, params, use_tqdm=False)[0]

    first = sample(7)
    llm.generate("Something else", SamplingParams(temperature=1.0, max_tokens=8),
                 use_tqdm=False)  # moves the shared (unseeded) random state
    again = sample(7)
    assert again.token_ids == first.token_ids and again.text == first.text
    other = sample(8)
    assert other.token_ids != first.token_ids
    # The seeded request gives the same tokens when it shares a call with other requests.
    params = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=7,
                             ignore_eos=True)]
    outs = llm.generate(["Another prompt", "Hello there"], params, use_tqdm=False)
    assert outs[1].token_ids == first.token_ids


def test_chi_square_critical_values():
    """The hard-coded table is right (checked against scipy when it is installed)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        # Wilson-Hilferty approximation, good to ~1% at these tail values.
        def quantile(dof):
            z = 3.0902  # standard normal 0.999 quantile
            return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        for dof, value in CHI2_CRITICAL_0001.items():
            assert abs(quantile(dof) - value) / value < 0.02
    else:
        for dof, value in CHI2_CRITICAL_0001.items():
            assert chi2.ppf(0.999, dof) == pytest.approx(value, abs=1e-3)

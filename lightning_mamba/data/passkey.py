"""The passkey retrieval task (paper App. B, InfiniteBench-style): prompts, grids, and training batches.

A prompt is ``instruction``, the ``filler`` line repeated, the ``needle`` line (holding the key) in place of
one filler line at depth d, and the ``question``; the answer is the key::

    There is important info hidden inside a lot of irrelevant text. Find it and memorize it.

    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
    ...
    The passkey is 34847. Remember it. 34847 is the passkey.
    ...
    What is the passkey? The passkey is| 34847

Lengths are in tokens of the run's tokenizer, and exact: ``length`` is the number of prompt tokens (what the
model reads before answering; the answer's tokens follow). Each piece (instruction, filler line, needle,
question) is encoded once and the prompt is the concatenation of those encodings, with one filler line cut
to a token prefix (and its line break) to hit the length exactly. For the byte tokenizer and GPT-2-style
byte-level BPEs (ours, GPT-NeoX's) the pieces meet at line breaks, where the pre-tokenizer splits anyway, so
this *is* the tokenizer's own encoding of the prompt text, apart from the one cut line;
:attr:`PasskeyGenerator.canonical` says whether that check passed for the tokenizer at hand.

The answer is the key's token ids *in context*: ``encode(question + answer)`` minus ``encode(question)``
(which must be its prefix). Scoring (``lightning_mamba.analysis.passkey``) is exact match on those tokens,
so a model that spells the same digits with other tokens counts as wrong (as a token-level greedy decode
compared with the reference tokens would).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datamodule import TextDataModule
from .errors import DataError
from .packed import PackedTextDataset, document_index
from .tokenization import Tokenizer

KEY = "{key}"  # placeholder in the needle and the answer
LOSS_ON = ("answer", "all")  # which tokens of a passkey training sample carry the loss
PROBE_KEYS = tuple(d * 5 for d in "0123456789") + ("01234", "56789", "98765", "43210", "10203")


class PasskeyError(DataError):
    """A passkey setting that cannot work (a ``ValueError``); the message is one line saying what to change."""


@dataclass(frozen=True)
class PasskeyTemplate:
    """The prompt's text; ``{key}`` in ``needle`` and ``answer`` is replaced by the key. Defaults: the paper's.

    Args:
        instruction: Opens the prompt.
        filler: The irrelevant line, repeated; it should end with a line break.
        needle: Replaces one filler line at the requested depth; holds the key.
        question: Ends the prompt; the model answers right after it.
        answer: What follows the question: the key, with the space the tokenizer puts before it.
    """

    instruction: str = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    filler: str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    needle: str = "The passkey is {key}. Remember it. {key} is the passkey.\n"
    question: str = "What is the passkey? The passkey is"
    answer: str = " {key}"

    def __post_init__(self) -> None:
        for name in ("needle", "answer"):
            if KEY not in getattr(self, name):
                raise PasskeyError(f"passkey template: {name} {getattr(self, name)!r} must contain {KEY} "
                                   f"where the key goes")
        if not self.filler:
            raise PasskeyError("passkey template: filler must not be empty")


def load_template(path: str | None) -> PasskeyTemplate:
    """The paper's template (``None``), or one from a YAML file of PasskeyTemplate's fields (e.g.
    configs/passkey/code.yaml, the code-form template for models trained on Python source)."""
    if path is None:
        return PasskeyTemplate()
    import yaml

    try:
        with open(path) as f:
            fields = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PasskeyError(f"passkey template {path} cannot be read ({type(e).__name__}): give a YAML file with "
                           f"instruction, filler, needle, question and answer") from e
    known = set(PasskeyTemplate.__dataclass_fields__)
    if not isinstance(fields, dict) or not set(fields) <= known:
        extra = sorted(set(fields) - known) if isinstance(fields, dict) else []
        raise PasskeyError(f"passkey template {path}: expected a mapping of {', '.join(sorted(known))}"
                           + (f" (unknown: {', '.join(map(str, extra))})" if extra else ""))
    return PasskeyTemplate(**fields)


@dataclass
class PasskeySample:
    """One prompt: ``input_ids`` (exactly ``length`` tokens) and the ``answer_ids`` that should follow.

    The haystack (filler lines and needle) spans tokens [haystack_start, haystack_end) of the prompt."""

    input_ids: np.ndarray  # int64 (length,)
    answer_ids: np.ndarray  # int64 (answer tokens,)
    key: str
    length: int
    depth: float  # the requested depth in [0, 1]
    needle_start: int  # token index of the needle's first token
    needle_len: int
    haystack_start: int
    haystack_end: int

    @property
    def tokens(self) -> np.ndarray:
        """The prompt followed by the answer."""
        return np.concatenate([self.input_ids, self.answer_ids])

    @property
    def actual_depth(self) -> float:
        """Where the needle is: filler tokens before it / all filler tokens (0 when there is no filler)."""
        filler = self.haystack_end - self.haystack_start - self.needle_len
        return (self.needle_start - self.haystack_start) / filler if filler > 0 else 0.0


def check_key(key: str, digits: int = 5) -> str:
    if not isinstance(key, str) or len(key) != digits or not all(c in "0123456789" for c in key):
        raise PasskeyError(f"passkey {key!r} must be a string of exactly {digits} ASCII digits, e.g. '04721'")
    return key


def check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise PasskeyError(f"passkey depth {depth} is outside [0, 1]: give the fraction of the filler "
                           f"before the needle (0 = right after the instruction, 1 = right before the question)")
    return float(depth)


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
    """``digits`` uniform random digits, leading zeros allowed."""
    return "".join(map(str, rng.integers(0, 10, size=digits)))


def default_depths(n: int) -> list[float]:
    """The paper's evenly spaced depths (i + 0.5) / n."""
    if n < 1:
        raise PasskeyError(f"the number of depths must be >= 1 (got {n})")
    return [(i + 0.5) / n for i in range(n)]


class PasskeyGenerator:
    """Passkey prompts of an exact token length for ``tokenizer`` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, template: PasskeyTemplate | None = None, digits: int = 5):
        if digits < 1:
            raise PasskeyError(f"passkey digits must be >= 1 (got {digits})")
        self.tokenizer, self.template, self.digits = tokenizer, template or PasskeyTemplate(), digits
        t, enc = self.template, tokenizer.encode
        self.filler_ids, self.question_ids = enc(t.filler), enc(t.question)
        if not self.filler_ids:
            raise PasskeyError("passkey template: the filler line encodes to no tokens")
        # The instruction as encoded *before a filler line* (a BPE may split its trailing blank line differently
        # there: "\n\n" alone vs "\n", "\n" before "The"); filler and needle lines both follow it.
        self.instruction_ids = enc(t.instruction)
        both, n = enc(t.instruction + t.filler), len(self.filler_ids)
        if both[-n:] == self.filler_ids:
            self.instruction_ids = both[:-n]
        # The cut filler line keeps its line break: a token prefix of the line + the break's tokens.
        ending = t.filler[len(t.filler.rstrip()):]
        tail = enc(ending) if ending else []
        self._tail = tail if tail and len(tail) < len(self.filler_ids) and self.filler_ids[-len(tail):] == tail else []
        self.answer_ids(self.probe_keys[0])  # a template whose question and answer merge fails here, not later
        self.canonical = all(self._is_canonical(k) for k in self.probe_keys[:3])

    @cached_property
    def probe_keys(self) -> list[str]:
        """A fixed set of keys (repeated digits, runs) for checks that cannot try all keys."""
        return [k[:self.digits].ljust(self.digits, k[-1]) for k in PROBE_KEYS]

    # ---- pieces ---------------------------------------------------------------------------------------------
    def needle_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(self.template.needle.replace(KEY, key))

    def answer_ids(self, key: str) -> list[int]:
        """The key's tokens in context: encode(question + answer) minus encode(question), a checked prefix."""
        full = self.tokenizer.encode(self.template.question + self.template.answer.replace(KEY, key))
        q = self.question_ids
        if full[:len(q)] != q or len(full) == len(q):
            raise PasskeyError(f"passkey template: under tokenizer {self.tokenizer.name} the question's tokens are "
                               f"not a prefix of question + answer (they merge across the boundary): end the question "
                               f"with a word and start the answer with a space, as the default template does")
        return full[len(q):]

    def template_length(self, key: str) -> int:
        """Prompt tokens with no filler at all: the shortest prompt for ``key``."""
        return len(self.instruction_ids) + len(self.needle_ids(key)) + len(self.question_ids)

    @cached_property
    def min_length(self) -> int:
        """The shortest usable prompt length (the template's length over a set of probe keys)."""
        return max(self.template_length(k) for k in self.probe_keys)

    def partial_filler(self, n: int) -> list[int]:
        """``n`` tokens of a filler line: a token prefix of it, ending with its line break where possible."""
        if n <= 0:
            return []
        if self._tail and n > len(self._tail):
            return self.filler_ids[:n - len(self._tail)] + self._tail
        return self.filler_ids[:n]

    def _is_canonical(self, key: str) -> bool:
        t = self.template
        text = t.instruction + t.filler * 2 + t.needle.replace(KEY, key) + t.filler + t.question
        pieces = self.instruction_ids + self.filler_ids * 2 + self.needle_ids(key) + self.filler_ids + self.question_ids
        return self.tokenizer.encode(text) == pieces

    # ---- prompts ----------------------------------------------------------------------------------------------
    def make(self, length: int, depth: float, key: str) -> PasskeySample:
        """A prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler (to within half a filler
        line when there are several)."""
        check_key(key, self.digits)
        depth = check_depth(depth)
        needle, answer = self.needle_ids(key), self.answer_ids(key)
        fixed = len(self.instruction_ids) + len(needle) + len(self.question_ids)
        if length < fixed:
            raise PasskeyError(f"passkey length {length} is shorter than the template ({fixed} tokens with tokenizer "
                               f"{self.tokenizer.name}): use lengths >= {self.min_length} or a shorter template")
        f = len(self.filler_ids)
        lines, rest = divmod(length - fixed, f)
        # The needle goes after `before` full lines, with the cut line first or last in the haystack: whichever
        # puts it nearest depth x (filler tokens).
        target = depth * (lines * f + rest)
        before = min(range(lines + 1), key=lambda k: min(abs(k * f - target), abs(k * f + rest - target)))
        cut_first = abs(before * f + rest - target) < abs(before * f - target)
        cut = self.partial_filler(rest)
        head = self.instruction_ids + (cut if cut_first else []) + self.filler_ids * before
        ids = head + needle + self.filler_ids * (lines - before) + ([] if cut_first else cut) + self.question_ids
        return PasskeySample(np.asarray(ids, dtype=np.int64), np.asarray(answer, dtype=np.int64), key, int(length),
                             depth, len(head), len(needle), len(self.instruction_ids), length - len(self.question_ids))

    def sample(self, length: int, depth: float, rng: np.random.Generator) -> PasskeySample:
        return self.make(length, depth, random_key(rng, self.digits))


def check_lengths(generator: PasskeyGenerator, lengths) -> list[int]:
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise PasskeyError("no passkey lengths given")
    short = [x for x in lengths if x < generator.min_length]
    if short:
        raise PasskeyError(f"passkey lengths {short} are shorter than the template ({generator.min_length} tokens with "
                           f"tokenizer {generator.tokenizer.name}): use lengths >= {generator.min_length}")
    return lengths


def cell_rng(seed: int, length: int, depth: float, index: int) -> np.random.Generator:
    """The key of sample ``index`` of a grid cell depends on (seed, length, depth, index) only, not on the grid."""
    return np.random.default_rng([seed, int(length), int(round(depth * 1e6)), index])


def grid_samples(generator: PasskeyGenerator, length: int, depth: float, n: int, seed: int = 0) -> list[PasskeySample]:
    """The ``n`` samples of one (length, depth) cell of an evaluation grid."""
    return [generator.sample(length, depth, cell_rng(seed, length, depth, j)) for j in range(n)]


def passkey_grid(generator: PasskeyGenerator, lengths, depths, n_per_cell: int, seed: int = 0):
    """Every cell of a lengths x depths grid: yields (length index, depth index, samples), lengths outermost."""
    lengths = check_lengths(generator, lengths)
    depths = [check_depth(d) for d in depths]
    if n_per_cell < 1:
        raise PasskeyError(f"samples per cell must be >= 1 (got {n_per_cell})")
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            yield li, di, grid_samples(generator, length, depth, n_per_cell, seed)


# ---- training: passkey samples mixed into LM batches --------------------------------------------------------
class PasskeyMixDataset(Dataset):
    """``text``'s samples, a seeded share ``ratio`` of them replaced by passkey samples of the same shape.

    A passkey sample is prompt + answer (at most seq_len + 1 tokens, so every answer token is a label), then
    EOS and the text sample's own tokens to fill the block. Its prompt length is uniform in
    [max(min_length, template), seq_len + 1 - answer tokens] and its depth uniform in [0, 1]. Labels: the
    answer tokens only (``loss_on="answer"``, -100 elsewhere) or every token (``"all"``). Sample i is the same
    every epoch (it is drawn from a generator seeded with (seed, i))."""

    def __init__(self, text: PackedTextDataset, generator: PasskeyGenerator, ratio: float, loss_on: str = "answer",
                 min_length: int | None = None, seed: int = 0):
        if not 0.0 <= ratio <= 1.0:
            raise PasskeyError(f"data.passkey_ratio must be in [0, 1] (got {ratio})")
        if loss_on not in LOSS_ON:
            raise PasskeyError(f"data.passkey_loss must be one of {', '.join(LOSS_ON)} (got {loss_on!r})")
        self.text, self.generator, self.ratio, self.loss_on = text, generator, ratio, loss_on
        self.min_length, self.seed, self.seq_len = min_length or 0, seed, text.seq_len
        longest_answer = max(len(generator.answer_ids(k)) for k in generator.probe_keys)
        if ratio > 0 and max(self.min_length, generator.min_length) + longest_answer > self.seq_len + 1:
            raise PasskeyError(f"data.seq_len={self.seq_len} is too short for passkey prompts: the template alone takes "
                               f"{generator.min_length} tokens + {longest_answer} answer tokens with tokenizer "
                               f"{generator.tokenizer.name} (and passkey_min_length={min_length}): raise data.seq_len "
                               f"or lower data.passkey_min_length, or use a shorter template")

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0x9A55, i])
        if rng.random() >= self.ratio:
            return self.text[i]
        gen = self.generator
        key = random_key(rng, gen.digits)
        answer_len = len(gen.answer_ids(key))
        lo = max(self.min_length, gen.template_length(key))
        hi = max(lo, self.seq_len + 1 - answer_len)
        sample = gen.make(int(rng.integers(lo, hi + 1)), float(rng.random()), key)
        block = sample.tokens[:self.seq_len + 1]
        fill = self.seq_len + 1 - len(block)
        if fill > 0:
            start = i * self.seq_len
            text = np.asarray(self.text.tokens[start:start + fill - 1], dtype=np.int64)
            block = np.concatenate([block, [gen.tokenizer.eos_id], text])
        inputs, labels = torch.from_numpy(block[:-1].copy()), torch.from_numpy(block[1:].copy())
        if self.loss_on == "answer":
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[sample.length - 1:sample.length - 1 + answer_len] = True  # labels[j] is token j + 1
            labels = labels.masked_fill(~keep, -100)
        out = {"input_ids": inputs, "labels": labels}
        if self.text.emit_seq_idx:
            out["seq_idx"] = torch.from_numpy(document_index(block[:-1], self.text.eos_id))
        return out


class PasskeyDataModule(TextDataModule):
    """:class:`TextDataModule` whose training batches mix in passkey samples; also the evaluation grid.

    Training: a share ``passkey_ratio`` of the training samples are passkey prompts no longer than the
    training length (see :class:`PasskeyMixDataset`); validation stays held-out LM text. Evaluation:
    :meth:`eval_grid` gives the samples of a lengths x depths grid, n per cell (what ``PasskeyEvalCallback``
    and ``lightning-mamba passkey`` score).

    Args:
        passkey_ratio: Share of training samples that are passkey prompts (0: plain LM text, 1: passkey only).
        passkey_loss: 'answer': loss on the answer tokens only; 'all': on every token of a passkey sample.
        passkey_min_length: Shortest training prompt in tokens (default: the template's length).
        passkey_digits: Digits of a key (the paper: 5).
        passkey_template: The prompt's text (default: the paper's).
        **kwargs: :class:`TextDataModule`'s arguments (source, tokenizer, seq_len, batch_size, ...).
    """

    def __init__(self, passkey_ratio: float = 0.5, passkey_loss: str = "answer", passkey_min_length: int | None = None,
                 passkey_digits: int = 5, passkey_template: PasskeyTemplate | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= passkey_ratio <= 1.0:
            raise PasskeyError(f"data.passkey_ratio must be in [0, 1] (got {passkey_ratio})")
        if passkey_loss not in LOSS_ON:
            raise PasskeyError(f"data.passkey_loss must be one of {', '.join(LOSS_ON)} (got {passkey_loss!r})")
        if passkey_digits < 1:
            raise PasskeyError(f"data.passkey_digits must be >= 1 (got {passkey_digits})")
        self.template = passkey_template or PasskeyTemplate()
        self.hparams.passkey_template = asdict(self.template)  # plain data in hparams.yaml

    @cached_property
    def passkey_generator(self) -> PasskeyGenerator:
        return PasskeyGenerator(self.tokenizer, self.template, self.hparams.passkey_digits)

    def eval_grid(self, lengths, depths, n_per_cell: int, seed: int = 0):
        """Evaluation mode: (length index, depth index, samples) for each cell; see :func:`passkey_grid`."""
        return passkey_grid(self.passkey_generator, lengths, depths, n_per_cell, seed)

    def train_dataloader(self) -> DataLoader:
        text_loader = super().train_dataloader()  # its checks on seq_len and batch_size apply
        h = self.hparams
        dataset = PasskeyMixDataset(text_loader.dataset, self.passkey_generator, h.passkey_ratio, h.passkey_loss,
                                    h.passkey_min_length, h.seed)
        return self.train_loader(dataset)  # the resumable seeded order, as the text data module

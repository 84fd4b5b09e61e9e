"""T_forget from a grid's verdicts by LEN: one rule for the sweep summary (per row and per seed), for T_forget along
training, and for the map over several studies."""

from __future__ import annotations


def t_forget_of(lens: list[int], verdicts: dict[int, bool]) -> dict:
    """T_forget of a row (or of one seed) from its verdicts by LEN (forgets: True, fails: False; a LEN absent from
    ``verdicts`` is missing or undetermined): the shortest LEN that forgets above the longest LEN that fails. The
    failures are the positive evidence: a budget too short to fail can leave a LEN flat under a failing one, so such a
    LEN does not decide (``forgets_below`` names it). ``t_forget_after`` is that failing LEN, so the training length
    that first forgets lies in (t_forget_after, t_forget]. No failure: the shortest LEN, when it forgets, bounds
    T_forget from above; no LEN above the longest failure: that LEN bounds it from below. A missing LEN where the
    answer is read (just above the longest failure; the shortest LEN when none fails) leaves it incomplete."""
    out = {"t_forget": None, "t_forget_after": None, "t_forget_lower_bound": None, "t_forget_upper_bound": None,
           "forgets_below": [], "status": "incomplete"}
    failing = [t for t in lens if verdicts.get(t) is False]
    if not failing:
        if lens and verdicts.get(lens[0]):
            # the grid's shortest LEN already forgets: T_forget is at most it, the grid cannot say more
            return {**out, "t_forget_upper_bound": lens[0], "status": "at_or_below_min_len"}
        return out  # the shortest LEN is not done yet (or has no verdict)
    longest = max(failing)
    out["forgets_below"] = [t for t in lens if t < longest and verdicts.get(t)]
    above = [t for t in lens if t > longest]
    if not above:
        return {**out, "t_forget_lower_bound": longest, "status": "above_max_len"}
    if above[0] not in verdicts:
        return out
    return {**out, "t_forget": above[0], "t_forget_after": longest, "status": "measured"}


def lens_deciding(lens: list[int], verdicts: dict[int, bool]) -> list[int]:
    """The LENs :func:`t_forget_of` reads to place T_forget (or its bound, or to stop short of one): the longest that
    fails and the next one above it, or (none failing) the shortest."""
    failing = [t for t in lens if verdicts.get(t) is False]
    if not failing:
        return lens[:1]
    longest = max(failing)
    return [longest, *[t for t in lens if t > longest][:1]]

"""The measured check of the plan against plain decoding: when it runs, what it keeps,
and how it backs off."""

from services.core.arm_check import CHECK_BELOW, CHECK_EVERY, CHECK_MAX, CHECK_PASSES, ArmCheck


class Replica:
    """Passes of 10 ms on a clock of its own; each arm commits its own tokens a pass."""

    def __init__(self, plain_tokens: int, plan_tokens: int):
        self.check, self.t = ArmCheck(), 0.0
        self.tokens = {True: plain_tokens, False: plan_tokens}
        self.armed: list[bool] = []  # the arm each pass ran

    def run(self, passes: int, gains) -> None:
        """``gains``: the plan's modelled gain at each pass, cycled."""
        gains = list(gains)
        for i in range(passes):
            plain = self.check.plain_now
            self.armed.append(plain)
            self.t += 0.010
            rate = self.tokens[self.check.plain_now] / 0.010  # the arm in use's, just before a check
            self.check.observe(self.t - 0.010, self.t, self.tokens[plain], lambda: rate, gains[i % len(gains)])


def test_a_plan_that_keeps_stopping_and_drafting_again_is_still_checked():
    """Served at 4 sampled streams the plan's gain hovered between 1.0 (drafting nothing)
    and 1.3. Passes at 1.0 count towards the check, which starts at the first pass
    where the plan drafts."""
    replica = Replica(plain_tokens=4, plan_tokens=3)  # drafting loses
    replica.run(CHECK_EVERY + 1, [1.0, 1.0, 1.0, 1.2])
    assert replica.check.window is not None and replica.check.plain_now
    replica.run(CHECK_PASSES, [1.0, 1.2])
    assert replica.check.checks == 1 and replica.check.plain  # measured faster: kept


def test_a_check_that_keeps_the_arm_backs_off_and_one_that_changes_it_starts_again():
    replica = Replica(plain_tokens=4, plan_tokens=3)
    replica.run(CHECK_EVERY + CHECK_PASSES, [1.2])
    assert replica.check.plain and replica.check.every == CHECK_EVERY  # changed to plain
    # Plain keeps winning: each check of the plan comes twice as late, up to CHECK_MAX.
    intervals = []
    for _ in range(6):
        start = len(replica.armed)
        replica.run(replica.check.every + CHECK_PASSES, [1.2])
        assert replica.armed[start:].count(False) == CHECK_PASSES  # the plan ran only while checked
        intervals.append(replica.check.every)
    assert intervals == [min(CHECK_MAX, CHECK_EVERY * 2 ** k) for k in range(1, 7)]
    # Drafting turns faster (acceptance came back): the next check goes back to the plan.
    replica.tokens[False] = 8
    replica.run(replica.check.every + CHECK_PASSES, [1.2])
    assert not replica.check.plain and replica.check.every == CHECK_EVERY


def test_where_the_model_is_sure_the_plan_runs_unchecked():
    replica = Replica(plain_tokens=4, plan_tokens=3)
    replica.run(CHECK_EVERY + CHECK_PASSES, [1.2])
    assert replica.check.plain
    replica.run(1, [CHECK_BELOW])  # e.g. the load fell: the model is sure again
    assert not replica.check.plain_now and replica.check.passes == 0 and replica.check.every == CHECK_EVERY
    replica.run(4 * CHECK_MAX, [CHECK_BELOW + 0.5])
    assert replica.check.checks == 1 and not any(replica.armed[-4 * CHECK_MAX:])


def test_a_plan_that_never_drafts_is_never_checked():
    replica = Replica(plain_tokens=4, plan_tokens=4)
    replica.run(4 * CHECK_MAX, [1.0])
    assert replica.check.checks == 0 and replica.check.window is None

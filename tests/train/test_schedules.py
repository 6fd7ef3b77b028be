import pytest

from doge_cli.config.schema import ScheduleConfig
from doge_cli.train.schedules import lr_multiplier


def curve(total, **kw):
    sched = ScheduleConfig(**kw)
    return [lr_multiplier(s, total, sched) for s in range(total)]


def test_warmup_stable_decay_shape():
    lrs = curve(100, name="warmup_stable_decay", warmup_ratio=0.1, decay_ratio=0.2, min_lr_rate=0.0)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_wsd_min_lr_rate():
    lrs = curve(50, name="warmup_stable_decay", warmup_ratio=0.0, decay_ratio=0.5, min_lr_rate=0.1)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.1)


def test_cosine_with_min_lr_reaches_the_floor():
    lrs = curve(200, name="cosine_with_min_lr", warmup_ratio=0.1, min_lr_rate=0.1)
    assert lrs[19] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert min(lrs[20:]) >= 0.1 - 1e-9
    mid = lrs[20 + 90]
    assert mid == pytest.approx(0.55, abs=0.01)


def test_constant_with_warmup():
    lrs = curve(10, name="constant_with_warmup", warmup_ratio=0.2)
    assert lrs[:2] == [0.5, 1.0] and set(lrs[2:]) == {1.0}

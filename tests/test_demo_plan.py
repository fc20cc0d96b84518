"""The demo's plan: the largest size that fits its time budget on this machine's
measured speed (plain arithmetic over measured rates; the speed check itself runs
for real here)."""

from __future__ import annotations

from scheduler import demo_plan
from scheduler.demo_plan import FULL_COUNT, FULL_EPOCHS, MIN_COUNT, MIN_EPOCHS, estimate, plan


def test_a_fast_machine_gets_the_full_demo_within_its_budget():
    p = plan(360, images_per_s=600, samples_per_s=1200)
    assert (p.count, p.epochs) == (FULL_COUNT, FULL_EPOCHS)
    assert p.estimate_s <= 360


def test_a_slower_machine_gets_fewer_epochs_then_fewer_captchas_and_still_fits():
    rates = (400, 500)
    full = estimate(FULL_COUNT, FULL_EPOCHS, *rates)
    assert full > 360  # the full demo would not fit
    p = plan(360, *rates)
    assert p.estimate_s <= 360 and MIN_EPOCHS <= p.epochs < FULL_EPOCHS
    slower = plan(360, 200, 150)
    assert slower.epochs == MIN_EPOCHS and MIN_COUNT <= slower.count < FULL_COUNT
    assert slower.estimate_s <= 360


def test_a_machine_too_slow_for_any_plan_gets_the_smallest_and_is_told():
    p = plan(360, 20, 20)
    assert (p.count, p.epochs) == (MIN_COUNT, MIN_EPOCHS) and p.estimate_s > 360
    assert "about" in p.describe() and f"{MIN_COUNT:,}" in p.describe()


def test_the_speed_check_measures_real_rendering_and_training_here():
    images, samples = demo_plan.measure(seconds=0.5)
    assert images > 1 and samples > 1

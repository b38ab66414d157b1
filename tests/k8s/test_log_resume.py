"""A replica's log stream resumed after a drop (issue 15 item 3): the executor asks again with ``sinceTime`` = the
timestamp of the last line it kept; the API server repeats the lines of that timestamp, which are skipped, so nothing
is read twice and nothing is lost. (kwok pods serve no logs, so the resume itself is not exercised on the local
control plane; this checks the rule on the stream's own format, ``<RFC 3339 with 0-9 fraction digits> <text>``.)"""
from __future__ import annotations

from pipelines.executors.kubernetes import _after, _ts_key

FIRST = ["2026-11-30T10:00:00.1Z step 1", "2026-11-30T10:00:00.12Z step 2", "2026-11-30T10:00:01Z step 3",
         "2026-11-30T10:00:01Z step 3 again"]


def test_a_fresh_stream_keeps_every_line_with_its_position():
    kept = list(_after(FIRST, ("", 0)))
    assert [text for text, _ in kept] == ["step 1", "step 2", "step 3", "step 3 again"]
    assert kept[-1][1] == ("2026-11-30T10:00:01Z", 2)  # two lines kept with the last timestamp


def test_a_stream_resumed_after_a_drop_skips_what_was_kept_and_loses_nothing():
    kept = list(_after(FIRST[:3], ("", 0)))  # the stream dropped after "step 3"
    resumed = ["2026-11-30T10:00:01Z step 3", "2026-11-30T10:00:01Z step 3 again", "2026-11-30T10:00:02.5Z step 4"]
    assert [text for text, _ in _after(resumed, kept[-1][1])] == ["step 3 again", "step 4"]
    everything = list(_after(FIRST, ("", 0)))
    assert [text for text, _ in _after(resumed, everything[-1][1])] == ["step 4"]


def test_timestamps_order_by_time_whatever_their_fraction_digits():
    assert _ts_key("2026-11-30T10:00:00.1Z") < _ts_key("2026-11-30T10:00:00.12Z") < _ts_key("2026-11-30T10:00:00.9Z")
    assert _ts_key("2026-11-30T10:00:00.999999999Z") < _ts_key("2026-11-30T10:00:01Z")

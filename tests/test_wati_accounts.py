"""Real WATI accounts (issue 12): the channel each reply goes out on, WATI's V3 send API beside v1, and WATI's
`result: false` answers — against the fake WATI of tests/fakes.py, a real HTTP server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import RunningApp, app_settings, customer_message, wait_until
from tests.fakes import FakeWati

Sql = Callable[..., list[tuple[Any, ...]]]

CUSTOMER = "50376819621"
CHANNEL_A, CHANNEL_B = "50322220000", "50322229999"


def test_each_conversation_is_answered_on_its_own_number_v1(
    run_app: Callable[..., RunningApp], database_url: str, fake_wati: FakeWati, sql: Sql
) -> None:
    """One customer writing to two of our numbers gets each reply from the number it wrote to (v1
    channelPhoneNumber)."""
    app = run_app(app_settings(database_url, fake_wati))
    assert app.post(customer_message(CUSTOMER, "to A", channelPhoneNumber=CHANNEL_A)).status_code == 200
    assert app.post(customer_message(CUSTOMER, "to B", channelPhoneNumber=CHANNEL_B)).status_code == 200
    sent = fake_wati.wait_for_sent(2)
    by_channel = {message["channel"]: message for message in sent}
    assert set(by_channel) == {CHANNEL_A, CHANNEL_B}
    assert "to A" in by_channel[CHANNEL_A]["text"] and "to B" not in by_channel[CHANNEL_A]["text"]
    assert "to B" in by_channel[CHANNEL_B]["text"] and "to A" not in by_channel[CHANNEL_B]["text"]
    assert all(message["wa_id"] == CUSTOMER for message in sent)
    wait_until(lambda: sql("SELECT count(*) FROM watibot.burst WHERE status = 'sent'") == [(2,)])
    assert len(fake_wati.sent) == 2

"""The inbox card says what a held call would touch, escaped like everything else on it."""

from __future__ import annotations

import time

from server.channels.inbox.render import card, environment
from server.models import RequestView, ReviewSpec


def render(impact: str | None) -> str:
    view = RequestView(
        id="r1", tool="sql_execute", principal="agent", on_behalf_of=None, model=None, args_hash="h",
        arguments={"statement": "DELETE FROM orders WHERE status = 'stale'"}, state="pending", risk="high",
        reason="writes orders", rules=[], review=ReviewSpec(impact=impact), created=time.time(),
        expires=time.time() + 60, votes=[])
    return environment().get_template("_card.html").render(c=card(view, {"statement": "sql"}, "alice"), csrf="t")


def test_the_inbox_card_shows_the_measured_impact() -> None:
    html = render("would delete 1,204 of 50,311 rows in orders")
    assert '<p class="impact"><strong>Would touch:</strong> would delete 1,204 of 50,311 rows in orders</p>' in html


def test_an_unknown_impact_is_shown_escaped_and_no_impact_shows_nothing() -> None:
    html = render("impact unknown: the database could not count the rows: <script>x</script>")
    assert "impact unknown: the database could not count the rows: &lt;script&gt;x&lt;/script&gt;" in html
    assert "<script>x" not in html
    assert 'class="impact"' not in render(None)

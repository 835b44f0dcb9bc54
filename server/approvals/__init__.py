"""Approvals: deciding reviewers' verdicts, quorum, holding a call while humans decide (rejoin, expiry, wake-ups),
and housekeeping.

  quorum.py    who a reviewer is, and when the approvers present fill a request's requirement
  broker.py    `ApprovalBroker`: the one place a verdict is judged (`decide`), rejoining, wake-ups, expiry and
               abandonment sweeps, and telling the channels
  kept.py      results of held calls kept (in memory, bounded) for the agent's retry
  holding.py   a held call, from the agent's side: open the request, wait (with progress), claim the approval
  proof.py     an approval proven from the ledger's chain before anything runs
"""

from server.approvals.broker import ApprovalBroker, Notifier
from server.approvals.kept import Delivery, KeptResults
from server.approvals.quorum import ReviewerDirectory, directory_from, quorum_met

__all__ = ["ApprovalBroker", "Delivery", "KeptResults", "Notifier", "ReviewerDirectory", "directory_from", "quorum_met"]

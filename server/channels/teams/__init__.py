"""The Microsoft Teams reviewer channel (the SDK is the optional `teams` extra).

channel.py        `attach_teams`: an Adaptive Card per held call, invokes at /teams/messages, follows the ledger
cards.py          the Adaptive Cards
auth.py           the Bot Framework JWT on every inbound activity
connector.py      the Bot Connector client and the incoming-webhook post, with retries
config.py         the `teams:` section of the config file and the secrets from the environment
decision_link.py  signed, single-use links for the no-bot fallback (an incoming webhook)
decision_page.py  the page such a link opens: GET shows, POST decides once

Nothing is imported here: `server.config` reads the section model without loading the Teams SDK.
"""

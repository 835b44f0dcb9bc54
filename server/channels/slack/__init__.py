"""The Slack reviewer channel.

channel.py   `attach_slack`: posts a message per held call, receives clicks (HTTP or Socket Mode), follows the ledger
blocks.py    the Block Kit messages and the reason modal
identity.py  a clicking Slack user -> `slack:<team>/<user>` (and by verified e-mail, when configured)
config.py    the `slack:` section of the config file, the tokens from the environment, the Web API client

Nothing is imported here: `server.config` reads the section model without loading Slack's SDK.
"""

"""The payment-channel contract's artefacts: its code (fetched and hash-checked at set-up)
and the cells of its data and messages.
"""

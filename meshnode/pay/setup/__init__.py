"""Keys and set-up: payment keys in the data dir and the payment contexts of a client and a
provider.
"""

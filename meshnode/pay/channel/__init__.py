"""A channel's lifecycle: opening, announcing, closing and watching (lifecycle), the
provider's side of /meshnode/channel/1 (service, protocol), what each side keeps on disk
(book, ledger), and the light client's pool of channels for routed jobs (pool).
"""

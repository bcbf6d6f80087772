"""Attestation shell: evidence producers (TDX via configfs-tsm, insecure dev) and the
verifier (dcap-qvl + core.attest_policy). See README.md in this folder."""

"""Secure aggregation: the server learns only the weighted sum of the updates of the sites present.

- `identity.py`: each site's long-term Ed25519 identity key (generated at the site, public key in the run
  manifest).
- `primitives.py`: the calls into `cryptography` and `pycryptodome` (X25519, HKDF, ChaCha20, AEAD, Shamir).
- `protocol.py`: one round of Bonawitz et al. (CCS 2017) for each site and for the server; the objects it
  exchanges are declared with every other message, in fedmedclip/federation/messages.py.
- The masking itself is a stage of the update's codec: `fedmedclip/codec/secure.py`; the protocol's place in
  the federation runtime (the server's sub-phases, the site's steps): `fedmedclip/federation/secure.py`.

Nothing is imported here: the federation's messages import `primitives`, and `protocol` imports the messages.
Threat model and costs: docs/secure-aggregation.md."""

"""Encrypted aggregation of the shared trunk (TenSEAL CKKS) for the consortium's FLARE job.

Members multiply their trunk by their weight and encrypt it packed (:mod:`jobs.he.filters`); the
operator's server only adds ciphertexts under the public context (:mod:`jobs.he.server`); members
decrypt the sum and divide by the plaintext weight sum. :mod:`jobs.he.recipe` wires the job,
:mod:`jobs.he.poc` installs the custodian's contexts into a POC workspace.
"""

"""Names that several layers and several machines must agree on, defined once.

A FLARE site, the operator's server, the key ceremony and the CLI each read these; a name changed
here changes everywhere at once.
"""

from __future__ import annotations

# -- governance ----------------------------------------------------------------------------------
HE_SCOPE = "consortium-he"
"""The privacy scope of member sites (``local/privacy.json``); the consortium job declares it."""
RESULT_FILTER_PATH = "jobs.site_policy.RequireEncryptedResult"
"""The site-policy result filter a member installs in that scope."""
TLS_REFUSAL_LOG_PATH = "jobs.tls_refusals.LogRefusedConnections"
"""The operator's server component (``local/resources.json``) that logs every refused TLS connection."""
AUTHORIZATION_FILE = "authorization.json"
PRIVACY_FILE = "privacy.json"

# -- homomorphic encryption ----------------------------------------------------------------------
CLIENT_CONTEXT_FILE = "client_context.tenseal"
"""A member's secret CKKS context (NVFlare's HEBuilder file name), in the kit's ``startup/``."""
SERVER_CONTEXT_FILE = "server_context.tenseal"
"""The operator's public CKKS context, in the server kit's ``startup/``."""
HE_MANIFEST_FILE = "he_context.json"

# -- secure aggregation (pairwise masks) ----------------------------------------------------------
MASK_KEY_FILE = "mask_key.x25519"
"""A member's X25519 private mask key (32 raw bytes, mode 0600), made in its own kit's ``startup/``; never sent."""
MASK_PUBLIC_KEYS_FILE = "mask_public_keys.json"
"""Every member's public mask key (hex, by site name), in each member kit's ``startup/``."""
SECAGG_RESEND_TASK = "secagg_resend"
"""The server asks a round's remaining members for their update again, masked for the shorter list."""
SECAGG_REVEAL_TOPIC = "secagg_reveal"
"""The server asks a round's contributors for the self-mask seed of the exchange it will open (an aux
message to each member over its open connection, not a task: no wait for the member's next poll)."""

# -- what a federated job leaves behind at the server ---------------------------------------------
GLOBAL_MODEL_FILE = "FL_global_model.sections"
"""The final aggregate the server stores: plaintext sums, or ciphertext sums under HE."""
PUBLISHED_FILE = "published.jsonl"
"""What the server received from the sites besides the model: one JSON record per site and round."""
JOB_ENDED_FILE = "job_ended.json"
"""Written in the server's run folder when the job's results are complete, and again when every component
has ended the job (:class:`jobs.job_end.MarkJobEnded`)."""

# -- a site's environment ------------------------------------------------------------------------
CONFIG_ENV = "CONSORTIUM_CONFIG"
"""Path of the member's own ``consortium.yaml`` at its site."""
OUTPUTS_ENV = "CONSORTIUM_SITE_OUTPUTS"
"""Folder where a site keeps its private outputs (final model, test predictions); never sent."""

# -- the job -------------------------------------------------------------------------------------
TRAIN_TASK = "train"
KEY_METRIC = "val_primary"
"""Mean over a member's endpoints of each one's primary validation metric."""

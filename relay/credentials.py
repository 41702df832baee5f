"""Compatibility: the credential names third-party auth plugins import from here, now kept in
their layers (`relay.core.credentials`, `relay.auth.cred`)."""
from relay.auth.cred import AccountRealm, IAccount, IAllocationPolicy, IStunCredentials  # noqa: F401
from relay.core.credentials import Account, StunCredentials  # noqa: F401

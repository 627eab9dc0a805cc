"""The ledger: PostgreSQL (a server of the user's, or an embedded one) and the queries on it."""

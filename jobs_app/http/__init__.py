"""The HTTP layer: Litestar controllers over the service layer; no SQL here."""

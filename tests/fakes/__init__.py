"""One fake per seam, for unit tests of pure logic. Never used outside tests."""

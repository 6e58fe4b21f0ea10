"""A synthetic market: securities, dealers, customers and realistic trading."""

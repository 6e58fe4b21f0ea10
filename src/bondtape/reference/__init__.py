"""Reference data: securities (CUSIP, grade, 144A, data set) and firms (MPID)."""
from bondtape.reference.cusip import cusip_check_digit, is_valid_cusip
from bondtape.reference.model import Firm, Security

__all__ = ["Firm", "Security", "cusip_check_digit", "is_valid_cusip"]

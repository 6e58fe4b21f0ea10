"""Rule 7730 fees (as amended by Regulatory Notice 10-14): the schedule as effective-dated
data, billable records, and monthly invoices traceable to their sources."""
from bondtape.fees.invoice import Invoice, Line, build_invoices, collect, price
from bondtape.fees.records import end_subscription, record_historic_order, record_subscription
from bondtape.fees.schedule import FeeError, Schedule, ScheduleBook, default_schedules, reporting_fee, reporting_tier
from bondtape.fees.writers import write_invoices

__all__ = [
    "FeeError", "Invoice", "Line", "Schedule", "ScheduleBook", "build_invoices", "collect", "default_schedules",
    "end_subscription", "price", "record_historic_order", "record_subscription", "reporting_fee", "reporting_tier",
    "write_invoices",
]

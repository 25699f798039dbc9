"""kubedpo trainer."""

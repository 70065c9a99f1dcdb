"""Stage ``rewrite``: exact rewrites always, approximate ones only when asked for and calibrated
(DESIGN.md section 3). One module per rewrite family."""

"""The T_forget study: a sweep that trains one model per (d_state, LEN) cell, its summary and fits, and the
passkey trend along a run."""

"""The functional core: Nova's vocabularies, the admission policy, action plans and the
recovery table. Pure Python, no I/O, readable side by side with DESIGN.md section 2."""

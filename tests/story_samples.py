"""A small two-character story shared by the end-to-end tests (7 panels, captions, an [NC] panel)."""

STORY = """[Ana] a girl with a yellow scarf
[Bo] a small brown dog

[Ana] reads a book #Monday.
[Bo] sleeps on a rug
[Ana] walks in the park #Tuesday.
[Bo] chases a ball
[Ana] and [Bo] run to the sea #Wednesday.
[NC] waves on a beach at night
[Ana] laughs #The end.
"""

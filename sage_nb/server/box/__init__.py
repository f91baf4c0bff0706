"""The box service (one sage_nb per machine serving shared engines to every user) and the link by
which each user's server lists and uses them. See docs/design.md, "The box service"."""

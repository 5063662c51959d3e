"""Stand-ins of SourceHut services, written with srht-readonly exactly as the real ones would be.

They are small on purpose: the same database habits as the real services (see docs/facts.md),
none of their features. The tests and the drill run them against the lab.
"""

"""Below every stage: errors, atomic publication, the metrics contract, fingerprints, output layout."""

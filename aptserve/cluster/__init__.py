"""Several engine replicas behind one router: the routing policies (pure) and what a replica reports to them."""

"""controller: the fleet side — fleetctl console and (later) the controller daemon that
signs and publishes releases, runs rollouts and places models. It imports
``edge_runtime.protocol`` and the engine for validation; ``edge_runtime`` never imports it.
"""

"""The biomarker multitask FLARE job: FedAvg over a shared trunk, private task heads per member.

``job.py`` builds the recipe; ``client.py`` is the Client API script each member site runs;
``site.py`` holds a site's state across rounds.
"""

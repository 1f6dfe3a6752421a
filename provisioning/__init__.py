"""consortium.yaml -> NVFlare project.yml, startup kits, the HE key ceremony and site policies."""

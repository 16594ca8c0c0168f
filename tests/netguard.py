# placeholder until the fetch work lands: fixtures live here.

from dynamos.cli import main

raise SystemExit(main())

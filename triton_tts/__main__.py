from triton_tts.cli import main

raise SystemExit(main())

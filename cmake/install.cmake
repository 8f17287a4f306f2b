# Install rules: `cmake --install build` and the Debian package (debian/rules runs them).
# Components: "server" (daemons, simulator, plugin, systemd units, example configs, docs,
# man pages) and "console" (otp-console, the only Qt program).
# Two destinations are where GStreamer and systemd look rather than under the prefix:
# the plugin goes into gstreamer-1.0's pluginsdir and the units into systemd's
# systemdsystemunitdir (both from pkg-config; override with -DOTPGATE_GST_PLUGINDIR=...
# and -DOTPGATE_SYSTEMD_UNITDIR=...). Paths written into the units and man pages come from
# CMAKE_INSTALL_PREFIX at configure time: configure with -DCMAKE_INSTALL_PREFIX=/usr for a
# system install.

pkg_get_variable(OTPGATE_GST_SYSTEM_PLUGINDIR gstreamer-1.0 pluginsdir)
set(OTPGATE_GST_PLUGINDIR "${OTPGATE_GST_SYSTEM_PLUGINDIR}" CACHE PATH
    "Where the otp GStreamer plugin is installed (default: GStreamer's own plugin folder)")
pkg_get_variable(_otpgate_unitdir systemd systemdsystemunitdir)
if(NOT _otpgate_unitdir)
  set(_otpgate_unitdir lib/systemd/system)
endif()
set(OTPGATE_SYSTEMD_UNITDIR "${_otpgate_unitdir}" CACHE PATH "Where the systemd units are installed")
set(_otpgate_etc "${CMAKE_INSTALL_FULL_SYSCONFDIR}/otpgate")

install(TARGETS otp-gateway otp-transfer qkd-kme-sim RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        COMPONENT server)
install(TARGETS gstotp LIBRARY DESTINATION ${OTPGATE_GST_PLUGINDIR} COMPONENT server)
install(TARGETS otp-console RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT console)

# systemd units, with the installed paths. A plugin outside GStreamer's own folder needs
# GST_PLUGIN_PATH in the units.
cmake_path(ABSOLUTE_PATH OTPGATE_GST_PLUGINDIR BASE_DIRECTORY "${CMAKE_INSTALL_PREFIX}"
           OUTPUT_VARIABLE _otpgate_plugindir_full)
set(OTPGATE_UNIT_PLUGIN_PATH "")
if(NOT _otpgate_plugindir_full STREQUAL OTPGATE_GST_SYSTEM_PLUGINDIR)
  set(OTPGATE_UNIT_PLUGIN_PATH "Environment=GST_PLUGIN_PATH=${_otpgate_plugindir_full}\n")
endif()
foreach(unit gateway/otp-gateway transfer/otp-transfer)
  cmake_path(GET unit FILENAME name)
  configure_file(${PROJECT_SOURCE_DIR}/${unit}.service.in ${PROJECT_BINARY_DIR}/systemd/${name}.service
                 @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/systemd/${name}.service DESTINATION ${OTPGATE_SYSTEMD_UNITDIR}
          COMPONENT server)
endforeach()

# Example configs: always in the documentation, and as templates in /etc/otpgate unless
# a config of that name is already there (an operator's filled-in config is never
# overwritten; the Debian package marks them as conffiles instead).
configure_file(gateway/examples/site-a.toml ${PROJECT_BINARY_DIR}/etc/otpgate/gateway.toml COPYONLY)
configure_file(transfer/examples/site-a.toml ${PROJECT_BINARY_DIR}/etc/otpgate/transfer.toml COPYONLY)
set(_otpgate_configs ${PROJECT_BINARY_DIR}/etc/otpgate/gateway.toml
                     ${PROJECT_BINARY_DIR}/etc/otpgate/transfer.toml)
install(FILES ${_otpgate_configs} DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples COMPONENT server)
install(CODE "
  foreach(config ${_otpgate_configs})
    cmake_path(GET config FILENAME name)
    if(EXISTS \"\$ENV{DESTDIR}${_otpgate_etc}/\${name}\")
      message(STATUS \"Kept: \$ENV{DESTDIR}${_otpgate_etc}/\${name} (the example is in ${CMAKE_INSTALL_FULL_DOCDIR}/examples)\")
    else()
      file(INSTALL DESTINATION \"${_otpgate_etc}\" TYPE FILE FILES \"\${config}\")
    endif()
  endforeach()" COMPONENT server)

file(GLOB _otpgate_docs CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/docs/*.md)
install(FILES README.md LICENSE ${_otpgate_docs} DESTINATION ${CMAKE_INSTALL_DOCDIR} COMPONENT server)

# Man pages from each program's --help (help2man), with a FILES/SEE ALSO part per program.
find_program(HELP2MAN_PROGRAM help2man)
option(OTPGATE_MANPAGES "Make man pages from --help with help2man" ON)
if(OTPGATE_MANPAGES AND NOT HELP2MAN_PROGRAM)
  message(STATUS "help2man not found: no man pages (scripts/install-deps.sh installs it)")
elseif(OTPGATE_MANPAGES)
  set(_otpgate_man_pages "")
  foreach(entry
      "otp-gateway|server|protect a site's conference RTP with a one-time pad from QKD"
      "otp-transfer|server|send and receive specimen files encrypted with a one-time pad from QKD"
      "qkd-kme-sim|server|an ETSI GS QKD 014 key management entity simulator for tests and demos"
      "otp-console|console|operator console for otpgate gateways and transfer services")
    string(REPLACE "|" ";" entry "${entry}")
    list(GET entry 0 program)
    list(GET entry 1 component)
    list(GET entry 2 summary)
    set(page ${PROJECT_BINARY_DIR}/man/${program}.1)
    configure_file(${PROJECT_SOURCE_DIR}/cmake/man/${program}.h2m.in ${PROJECT_BINARY_DIR}/man/${program}.h2m
                   @ONLY)
    # Run by bare name (PATH) so the synopsis says "otp-gateway", not the build path; Qt
    # prints otp-console's help without a display on its offscreen platform.
    add_custom_command(OUTPUT ${page}
      COMMAND ${CMAKE_COMMAND} -E env "PATH=$<TARGET_FILE_DIR:${program}>:$ENV{PATH}"
              QT_QPA_PLATFORM=offscreen
              ${HELP2MAN_PROGRAM} --no-info --section=1 --version-string=${PROJECT_VERSION}
              --name=${summary} --include=${PROJECT_BINARY_DIR}/man/${program}.h2m
              --output=${page} ${program}
      DEPENDS ${program} ${PROJECT_BINARY_DIR}/man/${program}.h2m
      COMMENT "Man page ${program}.1 (help2man)"
      VERBATIM)
    install(FILES ${page} DESTINATION ${CMAKE_INSTALL_MANDIR}/man1 COMPONENT ${component})
    list(APPEND _otpgate_man_pages ${page})
  endforeach()
  add_custom_target(otpgate-man-pages ALL DEPENDS ${_otpgate_man_pages})
endif()

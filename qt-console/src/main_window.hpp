// SPDX-License-Identifier: LGPL-2.1-or-later
// The console's window: key supplies (table and consumption chart), streams, transfers
// (the seed's job table with start/abort/delete), alerts.
#pragma once

#include <QCategoryAxis>
#include <QChart>
#include <QLineSeries>
#include <QMainWindow>
#include <QTableView>
#include <map>

#include "console.hpp"
#include "services_dialog.hpp"

class QLabel;
class QListView;
class QPushButton;

namespace otpgate::console {

class MainWindow : public QMainWindow {
  Q_OBJECT
 public:
  explicit MainWindow(QWidget* parent = nullptr);
  void add_service(ServicePoller::Kind kind, const QUrl& url, int poll_ms = 1000);
  void add_service(const ServiceEntry& entry, int poll_ms = 1000);
  // Replaces the services watched (their rows go with them).
  void set_services(const QList<ServiceEntry>& services, int poll_ms = 1000);
  // The services remembered in `settings` (which must outlive the window); with none, the
  // services dialog opens (without blocking) so that a first start asks for them.
  void start_from(QSettings* settings, int poll_ms = 1000);
  // Services > Edit services: the dialog; on OK the services are replaced and remembered.
  void edit_services();
  ServicesDialog* services_dialog() const { return services_dialog_; }

  LinkModel& links() { return links_; }
  KeySupplyModel& key_supplies() { return key_supplies_; }
  QTableView* link_view() { return link_view_; }
  QCategoryAxis* rate_axis() { return y_axis_; }
  QCategoryAxis* time_axis() { return x_axis_; }
  StreamModel& streams() { return streams_; }
  CallModel& calls() { return calls_; }
  JobModel& jobs() { return jobs_; }
  AlertLog& alerts() { return alerts_; }
  QString services_text() const;  // the status bar's service list ("host:port up")
  QTableView* job_view() { return job_view_; }
  QPushButton* start_button() { return start_; }
  QPushButton* abort_button() { return abort_; }
  QPushButton* delete_button() { return delete_; }
  std::vector<ServicePoller*> services() const { return services_; }
  bool confirm_deletes = true;  // tests answer the confirmation themselves

 private:
  void on_gateway(ServicePoller* service, const QJsonObject& status);
  void job_action(const QString& action);
  void update_service_label();
  std::map<const ServicePoller*, QString> health_;  // a gateway's last health verdict

  LinkModel links_;
  KeySupplyModel key_supplies_;
  StreamModel streams_;
  CallModel calls_;
  JobModel jobs_;
  AlertLog alerts_;
  std::vector<ServicePoller*> services_;
  QTableView* job_view_ = nullptr;
  QPushButton *start_ = nullptr, *abort_ = nullptr, *delete_ = nullptr;
  QLabel* services_label_ = nullptr;
  QSettings* settings_ = nullptr;
  ServicesDialog* services_dialog_ = nullptr;
  int poll_ms_ = 1000;
  QChart* chart_ = nullptr;
  QCategoryAxis *x_axis_ = nullptr, *y_axis_ = nullptr;
  // Consumption and refill history per link (site, peer, direction) as the gateways
  // publish them; the chart shows the selected link, or every link when none is selected.
  struct History {
    QList<QPointF> consumption, refill;  // (seconds since start, bit/s)
  };
  void record(const QString& key, double consumption_bps, double refill_bps, qint64 now);
  void redraw();
  void set_rate_axis(double top_bps);
  std::map<QString, History> history_;
  std::map<QString, std::pair<QLineSeries*, QLineSeries*>> shown_;
  QString selected_link_;  // "site|peer|direction", empty: every link
  QTableView* link_view_ = nullptr;
  qint64 started_ms_ = 0;
};

}  // namespace otpgate::console
